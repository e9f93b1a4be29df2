"""Run a coroutine on the fastest event loop available (uvloop when installed), and
stop it gracefully on SIGTERM as on SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import TypeVar

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


async def _stop_on_sigterm(main: Coroutine[object, object, T], terminated: list[bool]) -> T:
    """Await ``main``; on the first SIGTERM cancel it, as ``asyncio.Runner`` does on
    SIGINT, so that ``async with Bus.open(...)`` closes the bus on the way out."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_sigterm() -> None:
        terminated.append(True)
        # Back to the default: a second SIGTERM ends the process at once.
        loop.remove_signal_handler(signal.SIGTERM)
        task.cancel()

    installed = False
    # Only where no one else handles SIGTERM, and only the main thread gets signals.
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        with contextlib.suppress(NotImplementedError):  # loops without signal support
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
            installed = True
    try:
        return await main
    finally:
        if installed and not terminated:
            loop.remove_signal_handler(signal.SIGTERM)


def run(main: Coroutine[object, object, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion, on uvloop unless ``use_uvloop`` is False.

    SIGINT (Ctrl-C) and SIGTERM (what ``kill``, systemd, Docker and Kubernetes send to
    stop a service) both cancel ``main``: a bus it opened with ``async with
    Bus.open(...)`` then closes as on any exit from that block, flushing queued
    publishes and letting in-flight batches finish for up to ``close_timeout``. A
    second signal of the same kind stops the process at once.

    Raises:
        KeyboardInterrupt: After a stop on SIGINT.
        SystemExit: After a stop on SIGTERM, with status 143 (128 + SIGTERM).
    """
    factory = loop_factory() if use_uvloop else asyncio.new_event_loop
    terminated: list[bool] = []
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            return runner.run(_stop_on_sigterm(main, terminated))
        except asyncio.CancelledError:
            if terminated:
                raise SystemExit(TERMINATED) from None
            raise
