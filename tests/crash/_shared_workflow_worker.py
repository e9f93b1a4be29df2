"""A process running workflows on a log shared with others (PostgreSQL, or a SQLite
file opened with ``shared=True``), for tests/crash/test_shared_workflows.py.

    python _shared_workflow_worker.py URL SINK --runs N [--io S] [--start]

It registers ``fulfil`` (three steps, each appending ``(run, step, pid)`` to the
SQLite file SINK, which counts every execution, then awaiting ``--io`` seconds),
prints ``ready``; with ``--start`` it starts runs ``order-0 .. order-N-1`` (idempotent
by id: several processes may start the same ones). It then waits for every one of
them to complete, prints ``done`` and exits.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import threading

import anyio

from eventbus import Bus, BusConfig, Workflow, WorkflowError
from eventbus.storage import is_postgres_url


class Sink:
    """Every execution of a step, as an outside system would see it."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(
            path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS steps (run TEXT NOT NULL, step TEXT NOT NULL, pid INTEGER)"
        )
        self._lock = threading.Lock()

    def record(self, run: str, step: str) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO steps VALUES (?, ?, ?)", (run, step, os.getpid()))


async def main(url: str, sink_path: str, runs: int, io: float, start: bool) -> None:
    sink = Sink(sink_path)
    config = BusConfig(breaker=None, shared=not is_postgres_url(url))
    async with Bus.open(url, config=config) as bus:

        async def act(run: str, step: str) -> str:
            await anyio.to_thread.run_sync(sink.record, run, step)
            await anyio.sleep(io)
            return f"{step} {run}"

        @bus.workflow("fulfil")
        async def fulfil(wf: Workflow, order: int) -> str:
            run = f"order-{order}"
            await wf.step("reserve", act, run, "reserve")
            await wf.step("charge", act, run, "charge")
            return await wf.step("ship", act, run, "ship")

        print("ready", flush=True)  # noqa: T201 - the test reads it
        ids = [f"order-{i}" for i in range(runs)]
        if start:
            for i, run in enumerate(ids):
                await bus.start_workflow("fulfil", i, workflow_id=run)
        for run in ids:
            with anyio.fail_after(120):
                while True:
                    try:
                        handle = await bus.get_workflow(run)
                        break
                    except WorkflowError:  # not started yet, by the other process
                        await anyio.sleep(0.05)
                await handle.result()
        print("done", flush=True)  # noqa: T201 - the test reads it


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("sink")
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--io", type=float, default=0.0)
    parser.add_argument("--start", action="store_true")
    args = parser.parse_args()
    anyio.run(main, args.url, args.sink, args.runs, args.io, args.start)
    sys.exit(0)
