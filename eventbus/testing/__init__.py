"""``eventbus.testing``: test your handlers on an in-memory bus on a virtual clock.

Enable the pytest plugin with one line in your ``conftest.py``::

    pytest_plugins = ["eventbus.testing"]

Then ask for its fixtures in async tests (they run on anyio's pytest plugin, which
comes with eventbus; no mark needed)::

    async def test_billing_sends_an_invoice(bus, recorder, faults):
        @bus.subscribe("orders")
        async def billing(event: Event[Order], ctx: Context) -> None:
            await charge(event.payload)                   # await faults.point("charge") inside
            await ctx.publish("invoices", {"order": event.payload.id}, key=event.key)

        faults.fail("charge", times=2, exc=TimeoutError())  # two retries, then it works
        await bus.publish("orders", Order("o-1", 5), key="o-1")
        await bus.drain()          # retries take no time; a failing handler raises its error
        assert [e.payload for e in recorder.published("invoices")] == [{"order": "o-1"}]

- ``bus``: a :class:`~eventbus.Bus` on an in-memory log, on an event loop whose
  clock jumps over idle time (:class:`VirtualClockLoop`): retries, breaker
  cool-downs, workflow sleeps and timeouts take no wall time. Its ``drain()`` waits
  up to a week of virtual time and raises the first dead-lettered handler's own
  exception. Override the ``bus_config`` fixture to give it settings
  (``return kit_config(concurrency=4)``: :func:`kit_config` keeps the bus's
  background passes hourly, so that a virtual day passes in a tenth of a second).
- ``recorder``: :meth:`Recorder.published` lists the events committed on a topic,
  outbox publishes (``ctx.publish``) included.
- ``faults``: :meth:`Faults.fail` fails the next calls of a subscription's handler,
  or of a fault point (``await faults.point(name)``) in your code, which is a no-op
  outside tests.

Without pytest, :func:`open_kit` gives the same three on a :class:`VirtualClockLoop`
(``asyncio.Runner(loop_factory=VirtualClockLoop).run(main())``). Importing this
package does not import pytest, and nothing here costs anything in production.

PYTEST_DONT_REWRITE: a conftest.py or the application may import this package
before pytest loads it as a plugin; it has no assertions for pytest to rewrite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._faults import Faults, InjectedFault, faults
from ._kit import (
    DRAIN_TIMEOUT,
    BusKit,
    KitBus,
    NotOnVirtualClock,
    Recorder,
    kit_config,
    open_kit,
)
from ._loop import VirtualClockLoop

if TYPE_CHECKING:
    import pytest

__all__ = [
    "DRAIN_TIMEOUT",
    "BusKit",
    "Faults",
    "InjectedFault",
    "KitBus",
    "NotOnVirtualClock",
    "Recorder",
    "VirtualClockLoop",
    "faults",
    "kit_config",
    "open_kit",
]


def pytest_configure(config: pytest.Config) -> None:
    """Register the kit's fixtures (``pytest_plugins = ["eventbus.testing"]``)."""
    from . import _plugin  # imports pytest: only when pytest loads this plugin

    if not config.pluginmanager.is_registered(_plugin):
        config.pluginmanager.register(_plugin, "eventbus.testing.fixtures")
