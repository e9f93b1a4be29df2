"""The dashboard's response times on a big log: every page under 200 ms at p95.

    .venv/bin/python bench/dashboard.py                          # 1,000,000 events, 10,000 dead
    .venv/bin/python bench/dashboard.py --events 20000 --dead 500 --requests 5   # smoke

The fill writes rows in bulk through the storage's public API (``SQLiteStorage.commit``
of ``WriteBatch``es of 20,000 rows each): the events (about 100-byte msgpack payloads on
the topic ``orders``), two subscriptions (``audit`` caught up, ``billing`` 5,000 events
behind, so the overview reads a lag in seconds), the dead letters (of ``billing``, five
error types, each with a traceback of about 700 bytes), and 1,000 workflow runs with
three step checkpoints each (a tenth of them failed). No bus runs: the numbers are
those of ``eventbus serve FILE``, a read-only dashboard beside (or without) the bus.

Each page is asked ``--requests`` times (default 50) through an in-process HTTP client
(httpx over ASGI: no sockets, so the time is the dashboard's own, queries and
rendering) after one unmeasured request; the table gives p50, p95 and the verdict
against the 200 ms target. The exit status is 1 when a page misses it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec

import eventbus.dashboard as dashboard
from eventbus.storage import (
    DeadRecord,
    NewRecord,
    Record,
    SQLiteStorage,
    StepRecord,
    SubscriptionInfo,
    WorkflowRecord,
    WriteBatch,
)

TARGET = 0.200
CHUNK = 20_000
WORKFLOWS = 1_000
ERRORS = ("TimeoutError", "ValueError", "KeyError", "ConnectionError", "PermissionError")
_ENC = msgspec.msgpack.Encoder()
_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "app/billing.py", line 42, in bill\n'
    "    await payments.charge(order, idempotency_key=ctx.idempotency_key)\n" * 6
)


def _payload(i: int) -> bytes:
    return _ENC.encode({"order": i, "customer": f"c-{i % 977}", "amount": i % 500, "sku": "x" * 20})


def _records(lo: int, hi: int, start: float) -> Iterator[NewRecord]:
    for i in range(lo, hi):
        yield NewRecord(
            id=f"{i:032x}",
            topic="orders",
            key=f"order-{i}",
            payload=_payload(i),
            headers=None,
            created_at=start + i * 0.001,
        )


async def fill(path: str, events: int, dead: int) -> None:
    """Write the log (see the module's docstring)."""
    store = SQLiteStorage(path)
    await store.open()
    try:
        start = time.time() - events * 0.001 - 60
        for lo in range(0, events, CHUNK):
            await store.commit(
                WriteBatch(appends=list(_records(lo, min(events, lo + CHUNK), start)))
            )
        head = store.head
        now = time.time()
        await store.commit(
            WriteBatch(
                subscriptions=[
                    SubscriptionInfo("audit", ("orders",), 0, now),
                    SubscriptionInfo("billing", ("orders",), 0, now),
                ],
                acks={"audit": head, "billing": max(0, head - 5000)},
                done=[("audit", 1, head), ("billing", 1, max(1, head - 5000))],
            )
        )
        step = max(1, events // max(1, dead))
        seqs = list(range(1, head + 1, step))[:dead]
        for lo in range(0, len(seqs), CHUNK):
            rows = []
            for seq in seqs[lo : lo + CHUNK]:
                error = ERRORS[seq % len(ERRORS)]
                record = Record(
                    seq, f"{seq - 1:032x}", "orders", f"order-{seq}", _payload(seq), None, start
                )
                rows.append(
                    DeadRecord(
                        subscription="billing",
                        record=record,
                        attempts=5,
                        error_type=f"builtins.{error}",
                        error_message=f"{error} while charging order {seq}",
                        traceback=_TRACEBACK,
                        first_failed_at=now - 3600 + seq * 1e-3,
                        last_failed_at=now - 1800 + seq * 1e-3,
                    )
                )
            await store.commit(WriteBatch(dead=rows))
        runs, steps = [], []
        for n in range(WORKFLOWS):
            failed = n % 10 == 0
            wid = f"order-{n}"
            runs.append(
                WorkflowRecord(
                    id=wid,
                    name="fulfil",
                    status="failed" if failed else "completed",
                    input=_ENC.encode({"order": n}),
                    created_at=now - 600,
                    updated_at=now - 590,
                    output=None if failed else _ENC.encode(f"shipped {n}"),
                    error_type="builtins.ValueError" if failed else "",
                    error_message="card declined" if failed else "",
                    runs=1,
                )
            )
            for position, name in enumerate(("reserve", "charge", "ship")):
                bad = failed and name == "ship"
                steps.append(
                    StepRecord(
                        workflow_id=wid,
                        position=position,
                        name=name,
                        status="fatal" if bad else "done",
                        attempts=3 if bad else 1,
                        started_at=now - 600 + position,
                        finished_at=now - 599.5 + position,
                        output=None if bad else _ENC.encode({"step": name, "order": n}),
                        error_type="builtins.ValueError" if bad else "",
                        error_message="card declined" if bad else "",
                    )
                )
        await store.commit(WriteBatch(workflow_starts=runs, steps=steps))
    finally:
        await store.close()


def _pages(dead: int) -> list[tuple[str, str]]:
    mid = max(1, dead // 2)
    return [
        ("overview", "/"),
        ("overview (live update)", "/fragments/overview"),
        ("dead letters", "/dead-letters"),
        ("dead letters, filtered", "/dead-letters?subscription=billing&error_type=TimeoutError"),
        ("dead letters, by time", "/dead-letters?since=0&until=9999999999"),
        ("dead letters, a later page", f"/dead-letters?after={mid}"),
        ("dead letter", "/dead-letters/{seq}?subscription=billing"),
        ("workflows", "/workflows"),
        ("workflows, failed", "/workflows?status=failed"),
        ("workflow run", f"/workflows/order-{WORKFLOWS // 2}"),
        ("reconciliation", "/reconcile"),
    ]


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(path: str, dead: int, requests: int) -> list[tuple[str, float, float]]:
    """(page, p50, p95) in seconds per page."""
    app = dashboard.file_app(path)
    results = []
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c,
    ):
        first = await c.get("/dead-letters?subscription=billing")
        seq = first.text.split('data-seq="', 1)[1].split('"', 1)[0] if dead else "1"
        for label, url in _pages(dead):
            url = url.replace("{seq}", seq)
            expected = 404 if (label == "dead letter" and not dead) else 200
            response = await c.get(url)  # unmeasured: the first read warms the page cache
            if response.status_code != expected:
                raise SystemExit(f"{url} answered {response.status_code}: {response.text[:300]}")
            times = []
            for _ in range(requests):
                t0 = time.perf_counter()
                await c.get(url)
                times.append(time.perf_counter() - t0)
            results.append((label, _p(times, 0.5), _p(times, 0.95)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the log")
    parser.add_argument("--dead", type=int, default=10_000, help="dead letters in the log")
    parser.add_argument("--requests", type=int, default=50, help="measured requests per page")
    parser.add_argument("--path", help="the log to fill (default: a temporary file)")
    parser.add_argument(
        "--reuse", action="store_true", help="measure the log at --path as it is (no fill)"
    )
    args = parser.parse_args(argv)
    tmp = None
    path = args.path
    if path is None:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="eventbus-bench-")
        path = os.path.join(tmp.name, "dashboard.db")
    try:
        if not args.reuse:
            t0 = time.perf_counter()
            asyncio.run(fill(path, args.events, args.dead))
            size = Path(path).stat().st_size / 2**20
            print(
                f"filled {path}: {args.events} events, {args.dead} dead letters, "
                f"{WORKFLOWS} workflow runs ({size:.0f} MiB) in {time.perf_counter() - t0:.1f}s"
            )
        results = asyncio.run(measure(path, args.dead, args.requests))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"{'page':<28} {'p50 ms':>8} {'p95 ms':>8}  target {TARGET * 1000:.0f} ms")
    failed = 0
    for label, p50, p95 in results:
        verdict = "ok" if p95 < TARGET else "FAIL"
        failed += verdict == "FAIL"
        print(f"{label:<28} {p50 * 1000:>8.1f} {p95 * 1000:>8.1f}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
