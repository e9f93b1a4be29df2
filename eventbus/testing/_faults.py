"""Fault injection for tests: fail the next calls of a subscription's handler, or
raise at a named point in your own code.

::

    from eventbus.testing import faults

    async def charge(order: Order) -> None:
        await faults.point("charge")        # a no-op unless a test armed "charge"
        await payments.charge(order)

    # in a test
    faults.fail("billing", times=2, exc=TimeoutError())   # the handler's next 2 calls
    faults.fail("charge", exc=ConnectionError("down"))     # the next point("charge")

One process-wide :data:`faults` object, so that code under test needs no handle to
it. A point costs one dictionary check when nothing is armed (about 60 ns), nothing
else: leave points in production code.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Generator
from typing import Any

from .._errors import BusError


class InjectedFault(BusError):
    """The failure :meth:`Faults.fail` injects when it is given no exception.

    Attributes:
        name: The subscription or fault point it was armed for.
        number: Which of the armed failures this is (1 for the first).
        times: How many were armed.
    """

    def __init__(self, name: str, number: int, times: int) -> None:
        self.name = name
        self.number = number
        self.times = times
        super().__init__(
            f"injected fault {number} of {times} at {name!r} (armed by "
            f"faults.fail({name!r}, times={times})); pass exc= to raise your own exception"
        )


class _Done:
    """What :meth:`Faults.point` returns: awaiting it returns at once."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that finishes at once


_DONE = _Done()


class _Armed:
    __slots__ = ("exc", "fired", "times")

    def __init__(self, times: int, exc: BaseException | type[BaseException] | None) -> None:
        self.times = times
        self.exc = exc
        self.fired = 0


class Faults:
    """Failures armed by tests, fired by handler calls and fault points (see the
    module docstring). Use the process's one :data:`faults` object."""

    def __init__(self) -> None:
        self._armed: dict[str, _Armed] = {}
        self._fired: Counter[str] = Counter()

    def fail(
        self,
        name: str,
        *,
        times: int = 1,
        exc: BaseException | type[BaseException] | None = None,
    ) -> None:
        """Make the next ``times`` calls at ``name`` raise ``exc``.

        ``name`` is a subscription's name (its handler's calls on the kit's bus,
        each attempt and each batch a call) or a fault point's
        (``await faults.point(name)``). Arming a name again replaces what was left.

        Args:
            name: The subscription or fault point.
            times: How many calls fail; the ones after succeed.
            exc: An exception (a copy is raised each time, so each has its own
                traceback) or an exception class (instantiated with no argument);
                :class:`InjectedFault` by default.

        Raises:
            ValueError: ``name`` is empty, ``times`` below 1, or ``exc`` not an
                exception.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"faults.fail needs a subscription or point name, got {name!r}")
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a whole number of calls, at least 1; got {times!r}")
        if exc is not None and not (
            isinstance(exc, BaseException)
            or (isinstance(exc, type) and issubclass(exc, BaseException))
        ):
            raise ValueError(f"exc must be an exception or an exception class, got {exc!r}")
        self._armed[name] = _Armed(times, exc)

    def point(self, name: str) -> _Done:
        """A named point where a test can inject a failure: ``await
        faults.point("charge")``. Does nothing unless :meth:`fail` armed ``name``;
        then it raises when called (so a forgotten ``await`` still fails).

        Raises:
            BaseException: What :meth:`fail` armed for ``name``.
        """
        if self._armed:
            armed = self._armed.get(name)
            if armed is not None:
                self._fire(name, armed)
        return _DONE

    def fired(self, name: str) -> int:
        """How many failures were injected at ``name`` since the last :meth:`clear`."""
        return self._fired[name]

    def clear(self) -> None:
        """Disarm everything and forget what fired (the kit does this when it closes)."""
        self._armed.clear()
        self._fired.clear()

    def _fire(self, name: str, armed: _Armed) -> None:
        armed.fired += 1
        if armed.fired >= armed.times:
            del self._armed[name]
        self._fired[name] += 1
        exc = armed.exc
        if exc is None:
            raise InjectedFault(name, armed.fired, armed.times)
        if isinstance(exc, type):
            raise exc()
        try:
            fresh = copy.copy(exc)  # its own traceback, not one that grows each time
        except Exception:  # noqa: BLE001 - an exception that cannot be copied: raise it as is
            fresh = exc
        raise fresh


#: The process's faults (see the module docstring).
faults = Faults()
