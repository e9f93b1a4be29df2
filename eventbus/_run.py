"""Run a coroutine on the fastest event loop available (uvloop when installed), and
stop it gracefully on SIGTERM as on SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import TypeVar

from ._stopping import STOP_REQUEST, StopRequest

T = TypeVar("T")

#: The exit status after a graceful stop on SIGTERM, as a shell reports a process
#: ended by it.
TERMINATED = 128 + signal.SIGTERM


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop factory if uvloop imports, else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on CPython/POSIX
        return asyncio.new_event_loop
    return uvloop.new_event_loop


async def _stop_on_signals(main: Coroutine[object, object, T], stopped: list[int]) -> T:
    """Await ``main``; on the first SIGTERM or SIGINT, request a graceful stop and
    cancel it, so that ``async with Bus.open(...)`` closes the bus on the way out,
    letting the calls in flight finish."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    request = StopRequest()
    STOP_REQUEST.set(request)
    installed: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        stopped.append(sig)
        request.requested = True
        # Back to the default: a second signal ends the process at once.
        for each in installed:
            loop.remove_signal_handler(each)
        installed.clear()
        task.cancel()

    # Only where no one else handles them (asyncio.Runner's own SIGINT handler,
    # which would cancel without asking for a graceful stop, is replaced), and only
    # the main thread gets signals.
    if threading.current_thread() is threading.main_thread():
        for sig, default in (
            (signal.SIGTERM, signal.SIG_DFL),
            (signal.SIGINT, signal.default_int_handler),
        ):
            handler = signal.getsignal(sig)
            if isinstance(handler, functools.partial):
                handler = handler.func
            if handler == default or isinstance(getattr(handler, "__self__", None), asyncio.Runner):
                with contextlib.suppress(NotImplementedError):  # loops without signals
                    loop.add_signal_handler(sig, on_signal, sig)
                    installed.append(sig)
    try:
        return await main
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run(main: Coroutine[object, object, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion, on uvloop unless ``use_uvloop`` is False.

    SIGINT (Ctrl-C) and SIGTERM (what ``kill``, systemd, Docker and Kubernetes send to
    stop a service) both request a graceful stop and cancel ``main``: a bus it opened
    with ``async with Bus.open(...)`` then closes as on a normal exit from that
    block, flushing queued publishes and letting the calls in flight finish for up to
    ``close_timeout``. (A cancellation without such a request closes a bus at once.)
    A second signal stops the process at once.

    Raises:
        KeyboardInterrupt: After a stop on SIGINT.
        SystemExit: After a stop on SIGTERM, with status 143 (128 + SIGTERM).
    """
    factory = loop_factory() if use_uvloop else asyncio.new_event_loop
    stopped: list[int] = []
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            return runner.run(_stop_on_signals(main, stopped))
        except asyncio.CancelledError:
            if stopped and stopped[0] == signal.SIGTERM:
                raise SystemExit(TERMINATED) from None
            if stopped:
                raise KeyboardInterrupt from None
            raise
