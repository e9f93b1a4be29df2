"""examples/fastapi_app.py over HTTP: its lifespan runs, an order is published once
whatever the retries, handled through the outbox, and /metrics and /healthz say so;
in process (httpx's ASGI transport) and served by uvicorn over TCP."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from eventbus import Bus, LogLocked

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent.parent


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fastapi_app_example", ROOT / "examples" / "fastapi_app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations here
    spec.loader.exec_module(module)
    return module


example = load_example()


async def test_orders_are_published_once_handled_and_reported(tmp_path: Path) -> None:
    app = example.create_app(str(tmp_path / "app.db"), max_dead_letters=0)
    async with app.router.lifespan_context(app):
        bus: Bus = app.state.bus
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            order = {"customer": "ada", "amount": 5}
            first = await client.post("/orders", json=order, headers={"Idempotency-Key": "r-1"})
            assert first.status_code == 201
            again = await client.post("/orders", json=order, headers={"Idempotency-Key": "r-1"})
            assert again.status_code == 200
            assert again.json() == {**first.json(), "duplicate": True}
            other = await client.post("/orders", json={"customer": "ada", "amount": 7})
            assert other.status_code == 201
            await bus.drain(timeout=10, raise_failures=True)

            total = await client.get("/customers/ada")
            assert total.json() == {"customer": "ada", "total": 12}  # billed once each
            assert await bus.state("mailer").get("sent") == 2  # the outbox invoices

            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            text = metrics.text
            assert 'eventbus_events_handled_total{subscription="billing"} 2.0' in text
            assert 'eventbus_events_handled_total{subscription="mailer"} 2.0' in text
            assert 'eventbus_events_published_total{topic="invoices"} 2.0' in text
            assert 'eventbus_lag_events{subscription="billing"} 0.0' in text

            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.json() == {
                "ok": True,
                "problems": [],
                "lag": {"billing": 0, "mailer": 0},
                "dead_letters": 0,
            }

            # An order the handler refuses ends in the dead letters: unhealthy.
            bad = await client.post("/orders", json={"customer": "bob", "amount": -1})
            assert bad.status_code == 201
            await bus.drain(timeout=30)
            health = await client.get("/healthz")
            assert health.status_code == 503
            assert health.json()["problems"] == ["1 dead letters wait (bus.dead_letters)"]
            assert health.json()["dead_letters"] == 1


async def test_a_second_app_on_one_sqlite_log_fails_at_startup(tmp_path: Path) -> None:
    # What `uvicorn --workers 2` does without EVENTBUS_SHARED=true: each worker runs
    # the lifespan on the same file, and the second finds it owned.
    path = str(tmp_path / "app.db")
    one, two = example.create_app(path), example.create_app(path)
    async with one.router.lifespan_context(one):
        with pytest.raises(LogLocked):
            async with two.router.lifespan_context(two):
                pass


# -- served by uvicorn, as its docstring says to run it --------------------------------


class Served:
    """``uvicorn examples.fastapi_app:app`` in a process of its own, on a socket bound
    here (so that the port is known before it starts, and requests made before its
    lifespan has finished wait in the socket's backlog instead of failing)."""

    def __init__(self, db: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        port = self.socket.getsockname()[1]
        fd = self.socket.fileno()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--fd", str(fd), *args],
            cwd=ROOT,
            env={**os.environ, **(env or {}), "APP_DB": str(db)},
            pass_fds=[fd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def until(self, path: str, expected: object, timeout: float = 30.0) -> None:
        """GET ``path`` until it answers ``expected`` (the handlers run after the
        publish returns), or fail saying what it answered last."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.client.get(path).json()
            if got == expected:
                return
            assert time.monotonic() < deadline, f"GET {path} answered {got}, not {expected}"
            time.sleep(0.02)

    def stop(self) -> str:
        """SIGTERM, as a supervisor stops it; what it printed."""
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        self.socket.close()
        # uvicorn shuts down (the lifespan closes the bus), then exits by the signal
        # it was sent (newer releases) or with 0.
        assert self.process.returncode in (0, -signal.SIGTERM), out
        assert "Application shutdown complete" in out, out
        return out

    def kill(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=60)
        self.socket.close()


def test_served_by_uvicorn_over_http_it_keeps_orders_and_idempotency_across_a_restart(
    tmp_path: Path,
) -> None:
    db = tmp_path / "app.db"
    order = {"customer": "ada", "amount": 5}
    server = Served(db)
    try:
        first = server.client.post("/orders", json=order, headers={"Idempotency-Key": "r-1"})
        assert first.status_code == 201, first.text
        assert first.json()["duplicate"] is False
        other = server.client.post("/orders", json={"customer": "ada", "amount": 7})
        assert other.status_code == 201, other.text
        server.until("/customers/ada", {"customer": "ada", "total": 12})
        server.until(
            "/healthz",
            {"ok": True, "problems": [], "lag": {"billing": 0, "mailer": 0}, "dead_letters": 0},
        )
        metrics = server.client.get("/metrics").text
        assert 'eventbus_events_handled_total{subscription="billing"} 2.0' in metrics
        out = server.stop()
    finally:
        server.kill()
    assert "Traceback" not in out, out

    # Started again on the same file: the totals and the idempotency keys are there.
    server = Served(db)
    try:
        server.until("/customers/ada", {"customer": "ada", "total": 12})
        again = server.client.post("/orders", json=order, headers={"Idempotency-Key": "r-1"})
        assert again.status_code == 200, again.text
        assert again.json() == {**first.json(), "duplicate": True}
        bad = server.client.post("/orders", json={"customer": "bob", "amount": -1})
        assert bad.status_code == 201, bad.text
        server.until("/customers/ada", {"customer": "ada", "total": 12})
        deadline = time.monotonic() + 30
        while (health := server.client.get("/healthz")).status_code != 503:
            assert time.monotonic() < deadline, health.text
            time.sleep(0.02)
        assert health.json()["dead_letters"] == 1
        server.stop()
    finally:
        server.kill()


def test_uvicorn_workers_share_the_log_when_the_environment_says_so(tmp_path: Path) -> None:
    """``EVENTBUS_SHARED=true uvicorn ... --workers 2``: both workers start on one
    SQLite file (without it, the second fails with LogLocked), each publishes what
    it is sent, and the one dispatching bills every order once."""
    server = Served(tmp_path / "app.db", "--workers", "2", env={"EVENTBUS_SHARED": "true"})
    try:
        for i in range(20):  # a connection each, for either worker to take
            with httpx.Client(base_url=server.client.base_url, timeout=30) as client:
                placed = client.post(
                    "/orders",
                    json={"customer": "ada", "amount": 1},
                    headers={"Idempotency-Key": f"r-{i}"},
                )
                assert placed.status_code == 201, placed.text
        server.until("/customers/ada", {"customer": "ada", "total": 20})
        out = server.stop()
    finally:
        server.kill()
    assert out.count("Application startup complete") == 2, out
    assert "LogLocked" not in out, out
    assert "Traceback" not in out, out
