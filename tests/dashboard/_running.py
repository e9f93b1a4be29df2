"""A bus, and a dashboard server, running on an event loop in a thread of their own,
for tests that drive the dashboard from outside (a browser, an HTTP client)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
import uvicorn
from starlette.types import ASGIApp

from eventbus import Bus, BusConfig, RetryPolicy

T = TypeVar("T")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS_IMG = Path(__file__).resolve().parent.parent.parent / "docs" / "img"


class Shop:
    """The application the dashboards look at: billing fails an order until the test
    fixes it (``fixed``), audit never fails, and a workflow ``fulfil`` reserves and
    charges; an order whose id is in ``hold`` waits in its charge step until
    cancelled."""

    def __init__(self, *, breaker: bool = True) -> None:
        self.fixed: set[int] = set()
        self.hold: set[int] = set()
        # Off where a test fills the dead letters faster than a breaker would allow.
        self.breaker: Literal["default"] | None = "default" if breaker else None

    async def install(self, bus: Bus) -> None:
        @bus.subscribe(
            "orders", name="billing", retry=RetryPolicy(max_attempts=1), breaker=self.breaker
        )
        async def bill(event: Any, ctx: Any) -> None:
            order = event.payload
            if order.get("bad") and order["id"] not in self.fixed:
                raise ValueError(f"card declined for order {order['id']}")

        @bus.subscribe("orders", name="audit")
        async def audit(event: Any, ctx: Any) -> None:
            return None

        async def reserve(order: dict[str, Any]) -> dict[str, Any]:
            return {"reserved": order["id"], "items": order.get("items", 1)}

        async def charge(reserved: dict[str, Any]) -> str:
            if reserved["reserved"] in self.hold:
                await asyncio.Event().wait()  # until cancelled
            return f"charged order {reserved['reserved']}"

        @bus.workflow("fulfil")
        async def fulfil(wf: Any, order: dict[str, Any]) -> str:
            reserved = await wf.step("reserve", reserve, order)
            result: str = await wf.step("charge", charge, reserved)
            return result


class Running:
    """Runs ``Bus.open(path)`` with ``shop`` installed, and, given ``app``, serves
    ``app(bus)`` with uvicorn on a free port of 127.0.0.1, in a thread; ``call`` runs a
    coroutine there."""

    def __init__(
        self,
        path: Path,
        shop: Shop,
        app: Callable[[Bus], ASGIApp] | None = None,
        *,
        lifespan: str = "off",
    ) -> None:
        self.path = path
        self.shop = shop
        self._app = app
        self._lifespan = lifespan
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.bus: Bus | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Running:
        self._thread.start()
        if not self._ready.wait(30) or self._failure is not None:
            raise RuntimeError("the bus or its dashboard did not start") from self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._sock.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = BusConfig(control_interval=0.1)
        async with Bus.open(str(self.path), config=config) as bus:
            self.bus = bus
            await self.shop.install(bus)
            server = None
            if self._app is not None:
                server = uvicorn.Server(
                    uvicorn.Config(
                        self._app(bus),
                        log_level="warning",
                        lifespan=self._lifespan,
                        ws="none",
                    )
                )
                serving = asyncio.create_task(server.serve(sockets=[self._sock]))
            self._ready.set()
            await self._stop.wait()
            if server is not None:
                server.should_exit = True
                await serving

    def call(self, fn: Callable[[Bus], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
        """Run ``fn(bus)`` on the bus's loop and return its result."""
        assert self.loop is not None
        assert self.bus is not None
        bus = self.bus
        return asyncio.run_coroutine_threadsafe(fn(bus), self.loop).result(timeout)


async def orders(bus: Bus, ids: range, *, bad: bool = False) -> None:
    """Publish orders with these ids (failing billing when ``bad``), and drain."""
    for i in ids:
        await bus.publish("orders", {"id": i, "bad": bad, "amount": i * 10}, key=f"order-{i}")
    await bus.drain(30)


def serve_in_thread(app: ASGIApp) -> tuple[str, Callable[[], None]]:
    """Serve ``app`` on a free port in a thread; returns its URL and a stop function."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", ws="none"))
    thread = threading.Thread(target=lambda: server.run(sockets=[sock]), daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def browser() -> Any:
    """A headless Chromium driven through chromedriver; skips, saying why, where
    either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            pytest.skip(
                f"{binary} is missing: `make chromium` installs Debian's chromium and "
                "chromium-driver (as root, with apt-get)"
            )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,860")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_until(driver: Any, condition: Callable[[Any], object], timeout: float = 15) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A live region replaced between finding an element and reading it: look again.
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    ).until(condition)


def element(driver: Any, element_id: str, timeout: float = 15) -> Any:
    """The element with this id, once the page that has it has loaded (a click that
    submits a form returns before the next page is there)."""
    from selenium.webdriver.common.by import By

    return wait_until(driver, lambda d: (d.find_elements(By.ID, element_id) or [None])[0], timeout)


def screenshot(driver: Any, name: str) -> None:
    """Take the page as a PNG; write it as docs/img/dashboard-NAME.png (the
    documentation shows them) when that file is missing or ``UPDATE_SCREENSHOTS`` is
    set (``make screenshots``), so that a test run leaves the checkout as it was."""
    png = driver.get_screenshot_as_png()
    assert png.startswith(b"\x89PNG"), f"the {name} page did not render"
    path = DOCS_IMG / f"dashboard-{name}.png"
    if os.environ.get("UPDATE_SCREENSHOTS") or not path.exists():
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
