"""A service under ``eventbus.run`` stops gracefully on SIGTERM, as on SIGINT:
queued publishes are flushed and in-flight work finishes and is acknowledged."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

from eventbus.storage import SQLiteStorage

WORKER = Path(__file__).with_name("_term_worker.py")


async def read_back(path: Path) -> tuple[list[tuple[str, object]], int, bytes | None]:
    """(topic, payload) of every event, billing's cursor, and its "billed" state."""
    store = SQLiteStorage(path, read_only=True)
    await store.open()
    try:
        events = await store.read(0, store.head, None, 100)
        cursor = (await store.subscriptions())["billing"].cursor
        state = await store.get_state("billing", ["billed"])
    finally:
        await store.close()
    return (
        [(e.topic, msgspec.msgpack.decode(e.payload)) for e in events],
        cursor,
        state.get("billed"),
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sig", "statuses"),
    [
        # Regression: SIGTERM killed the process at once (status -15), dropping the
        # handler's work and anything queued.
        (signal.SIGTERM, {143}),
        (signal.SIGINT, {-signal.SIGINT, 130}),  # KeyboardInterrupt, as before
    ],
)
def test_a_stop_signal_flushes_publishes_and_finishes_in_flight_work(
    log_path: Path, sig: signal.Signals, statuses: set[int]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(log_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job starts with SIGINT ignored, and the worker would
        # inherit that: Python then leaves SIGINT alone, as it should for a program
        # started that way. Start the worker as from a terminal.
        preexec_fn=_sigint_default,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline() == "handling 7\n"  # the handler is in flight
        proc.send_signal(sig)
        assert proc.stdout.readline() == "stopping\n"  # the body left; the bus closes
        proc.stdin.write("done\n")  # the in-flight handler may finish now
        proc.stdin.flush()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode in statuses, err
    events, cursor, billed = anyio.run(read_back, log_path)
    assert sorted(events, key=str) == sorted(
        [("orders", 7), ("invoices", 7), ("audit", "stopping")], key=str
    )
    assert cursor >= 1  # the order's acknowledgement committed
    assert billed is not None
    assert msgspec.msgpack.decode(billed) == 7
