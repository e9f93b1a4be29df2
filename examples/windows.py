"""Per-customer payment totals per minute of event time, exactly once across kill -9.

    python examples/windows.py [FILE] [--events 20000]

Payments carry the time they happened ("ts", seconds) in their payload and arrive a
little out of order (up to 7 s behind their place in the stream: less than the
operator's 10 s lateness, so none is late). A tumbling-window operator sums them per
customer and minute; when a customer's watermark passes the end of a minute, that
minute's total is published to "minute-totals" through the operator's outbox, and a
second subscription, "ledger", books each published total in its own state.

Kill it at any moment (kill -9) and run it again: payments are published with
idempotency keys, the operator resumes from its last commit, and at the end every
minute is booked once with the right total (the last minute of each customer stays
open: nothing later has arrived to close it).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import TypedDict

from eventbus import Bus, Context, Event, Message, operators, run

CUSTOMERS = 5
MINUTE = 60
LATENESS = 10


class MinuteTotal(TypedDict):
    """A closed window's result, as the operator publishes it."""

    key: str
    start: int
    end: int
    value: int


def payment(n: int) -> Message:
    """The n-th payment: its event time runs 0-7 s behind its place in the stream."""
    return Message(
        "payments",
        {"n": n, "amount": n % 13 + 1, "ts": n - n * 37 % 8},
        key=f"customer-{n % CUSTOMERS}",
        idempotency_key=f"payment-{n}",
    )


def add(total: int, event: Event[dict[str, int]]) -> int:
    return total + event.payload["amount"]


def happened_at(event: Event[dict[str, int]]) -> int:
    return event.payload["ts"]


def register(bus: Bus) -> operators.Windows[int]:
    """The windowed operator and the ledger that books its results."""
    minutes = operators.tumbling(
        bus,
        "payments",
        name="minute-totals",
        size=MINUTE,
        aggregate=add,
        initial=0,
        emit="minute-totals",
        lateness=LATENESS,
        time=happened_at,
    )

    @bus.subscribe("minute-totals", name="ledger")
    async def book(event: Event[MinuteTotal], ctx: Context) -> None:
        # State keyed by the event key's own windows: [total, times booked].
        entry = f"{event.payload['key']}/{event.payload['start']:08d}"
        booked = await ctx.state.get(entry, [0, 0])
        assert isinstance(booked, list)
        ctx.state.set(entry, [event.payload["value"], booked[1] + 1])

    return minutes


def expected_totals(events: int) -> dict[tuple[str, int], int]:
    """The batch recomputation: a group-by over (customer, minute)."""
    totals: dict[tuple[str, int], int] = defaultdict(int)
    for n in range(events):
        message = payment(n)
        payload = message.payload
        assert isinstance(payload, dict)
        assert message.key is not None
        totals[message.key, payload["ts"] // MINUTE * MINUTE] += payload["amount"]
    return dict(totals)


async def main(path: Path, events: int) -> int:
    async with Bus.open(path) as bus:
        minutes = register(bus)
        for first in range(0, events, 1000):
            await bus.publish_many(payment(n) for n in range(first, min(events, first + 1000)))
        print(f"published {events} payments", flush=True)
        await bus.drain(timeout=300)
        booked: dict[tuple[str, int], int] = {}
        twice = 0
        async for entry, value in bus.state("ledger").items():
            customer, start = entry.rsplit("/", 1)
            assert isinstance(value, list)
            total, times = value
            booked[customer, int(start)] = total
            twice += times - 1
        still_open = {(w.key, int(w.start)): w.value async for w in minutes.open_windows()}
        late = await minutes.late_count()
    for customer in sorted({c for c, _ in booked}):
        mine = sorted((s, t) for (c, s), t in booked.items() if c == customer)
        last = ", ".join(f"{s}s: {t}" for s, t in mine[-3:])
        print(f"{customer}: {len(mine)} minutes closed, last ones {last}")
    for (customer, minute), so_far in sorted(still_open.items()):
        print(f"{customer}: minute {minute}s still open, {so_far} so far")
    exact = {**booked, **still_open} == expected_totals(events) and not booked.keys() & still_open
    print(f"windows closed: {len(booked)}; open: {len(still_open)}; booked twice: {twice}")
    print(f"late payments: {late}")
    ok = exact and twice == 0 and late == 0
    print("OK: every minute exact, none twice" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=Path("windows.db"))
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    sys.exit(run(main(args.file, args.events)))
