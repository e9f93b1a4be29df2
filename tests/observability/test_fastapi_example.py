"""examples/fastapi_app.py over HTTP: its lifespan runs, an order is published once
whatever the retries, handled through the outbox, and /metrics and /healthz say so."""

from __future__ import annotations

import importlib.util
import sys
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
    # What `uvicorn --workers 2` does: each worker runs the lifespan on the same file.
    path = str(tmp_path / "app.db")
    one, two = example.create_app(path), example.create_app(path)
    async with one.router.lifespan_context(one):
        with pytest.raises(LogLocked):
            async with two.router.lifespan_context(two):
                pass
