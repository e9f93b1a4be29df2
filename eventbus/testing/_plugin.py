"""The pytest side of :mod:`eventbus.testing`: its fixtures, and the virtual clock
for the tests that use them. Registered by the package's ``pytest_configure``, so
that importing :mod:`eventbus.testing` (for fault points in application code) never
imports pytest."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from .._bus import Bus
from .._config import BusConfig
from ._faults import Faults
from ._faults import faults as _faults
from ._kit import BusKit, Recorder, kit_config, open_kit
from ._loop import VirtualClockLoop

# The fixtures that need the bus's event loop on a virtual clock.
_KIT_FIXTURES = frozenset({"bus_kit", "bus", "recorder"})

#: anyio's backend for the kit's tests: asyncio, on a virtual clock.
VIRTUAL_CLOCK_BACKEND = ("asyncio", {"loop_factory": VirtualClockLoop})


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that uses the kit runs on anyio's asyncio backend with a virtual-clock
    loop, whatever ``anyio_backend`` says elsewhere (a parametrize mark outranks
    fixtures)."""
    if _KIT_FIXTURES.isdisjoint(metafunc.fixturenames):
        return
    metafunc.definition.add_marker(
        pytest.mark.parametrize("anyio_backend", [VIRTUAL_CLOCK_BACKEND], ids=["asyncio"])
    )


@pytest.fixture
def bus_config() -> BusConfig:
    """The settings of the kit's bus (:func:`~eventbus.testing.kit_config`):
    override this fixture to change them, ``return kit_config(concurrency=4)``."""
    return kit_config()


@pytest.fixture
async def bus_kit(anyio_backend: object, bus_config: BusConfig) -> AsyncIterator[BusKit]:
    """The kit (:func:`~eventbus.testing.open_kit`): ``bus``, ``recorder``,
    ``faults``, open for the test and closed after it."""
    async with open_kit(bus_config) as kit:
        yield kit


@pytest.fixture
def bus(bus_kit: BusKit) -> Bus:
    """An in-memory bus on a virtual clock; ``await bus.drain()`` raises a
    dead-lettered handler's own exception."""
    return bus_kit.bus


@pytest.fixture
def recorder(bus_kit: BusKit) -> Recorder:
    """What was published on ``bus``: ``recorder.published("invoices")``."""
    return bus_kit.recorder


@pytest.fixture
def faults() -> Iterator[Faults]:
    """The process's :data:`~eventbus.testing.faults`, disarmed before and after
    the test."""
    _faults.clear()
    yield _faults
    _faults.clear()
