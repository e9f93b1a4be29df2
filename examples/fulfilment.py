"""Order fulfilment that survives kill -9: a workflow per order, a revenue operator,
the retry lane, and a reconciliation report at the end.

    python examples/fulfilment.py [--orders N] [--dir DIR] [--move-to POSTGRES_URL]

The program runs the service twice, in child processes, on one log file:

1. The first run takes orders and fulfils them. Half-way, inside a workflow step
   (the payment gateway has charged the card, the step's output is not yet
   checkpointed), it SIGKILLs itself.
2. The second run opens the same log. Unfinished workflows resume by themselves,
   replaying only their unfinished steps; the interrupted charge runs again with
   the same idempotency key, so the gateway does not charge twice.

With ``--move-to postgresql://user@host/db?schema=orders`` the log moves between the
two runs: ``eventbus migrate`` copies the killed run's SQLite log into that (new or
empty) PostgreSQL schema, and the second run goes on there. The service's code is
the same; only the URL it opens changes (``--log``, which a child run takes too).

Then it checks the outside world (charges, emails) and the revenue per customer
against the orders, prints the bus's reconciliation report, and exits non-zero if
anything is off.

The pieces:

- ``orders`` subscription: starts one ``fulfil`` workflow per order event, with
  the event's id as workflow id (exactly one run per order).
- ``fulfil`` workflow: reserve stock, charge the card (a flaky gateway: the step
  retries with backoff), ship (publishes ``order.shipped``).
- ``email`` subscription on ``order.shipped``: a flaky mail service; failures go
  to the retry lane with backoff, off the hot path.
- ``revenue`` operator: ``reduce`` of ``order.charged`` per customer, its state
  committed with its position in the log.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

from eventbus import (
    Bus,
    BusConfig,
    Context,
    Event,
    Message,
    RetryPolicy,
    Workflow,
    current_step,
)
from eventbus.operators import reduce

CUSTOMERS = 20


class Order(msgspec.Struct):
    id: str
    customer: str
    sku: str
    amount: int


class Reservation(msgspec.Struct):
    order: str
    bin: int


class Shipment(msgspec.Struct):
    order: str
    tracking: str


def add_amount(total: int, event: Event[dict[str, int]]) -> int:
    return total + event.payload["amount"]


def make_orders(n: int) -> list[Order]:
    return [
        Order(f"o-{i:05d}", f"c-{i % CUSTOMERS:02d}", f"sku-{i % 7}", 5 + (i * 37) % 200)
        for i in range(n)
    ]


# Transient means transient: a request fails at most this many times in a row.
MAX_FAILURES = 3


def unlucky(key: str, attempt: int, percent: int) -> bool:
    """Deterministic flakiness: the same call fails the same way on every run, and
    never more than MAX_FAILURES times (else, once in a few thousand runs, a key whose
    first eight tries all fail would use up every attempt of its retry policy)."""
    if attempt > MAX_FAILURES:
        return False
    digest = hashlib.blake2b(f"{key}/{attempt}".encode(), digest_size=2).digest()
    return int.from_bytes(digest) % 100 < percent


class GatewayTimeout(ConnectionError):
    """The payment gateway did not answer in time (transient)."""


class MailServerBusy(ConnectionError):
    """The mail server refused the connection (transient)."""


class Outside:
    """The outside systems, in their own SQLite file: a payment gateway and a mail
    service. Both honour idempotency keys, like real ones do; every request is
    logged, so the report can show what was retried."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS charges (key TEXT PRIMARY KEY, orderid TEXT, amount INT);
            CREATE TABLE IF NOT EXISTS emails (key TEXT PRIMARY KEY, orderid TEXT);
            CREATE TABLE IF NOT EXISTS requests (service TEXT, key TEXT);
            CREATE INDEX IF NOT EXISTS requests_key ON requests (service, key);
            """
        )

    def charge(self, order: Order, key: str) -> str:
        self.db.execute("INSERT INTO requests VALUES ('charge', ?)", (key,))
        # The gateway's n-th request for this key, counted by the gateway: a kill of
        # the app does not make it repeat its timeouts.
        (tries,) = self.db.execute(
            "SELECT count(*) FROM requests WHERE service = 'charge' AND key = ?", (key,)
        ).fetchone()
        if unlucky(key, tries, 15):
            raise GatewayTimeout(f"gateway timed out charging {order.id}")
        self.db.execute(
            "INSERT OR IGNORE INTO charges VALUES (?, ?, ?)", (key, order.id, order.amount)
        )
        return f"ch_{hashlib.blake2b(key.encode(), digest_size=6).hexdigest()}"

    def send_mail(self, order_id: str, key: str, attempt: int) -> None:
        self.db.execute("INSERT INTO requests VALUES ('email', ?)", (key,))
        if unlucky(key, attempt, 20):
            raise MailServerBusy(f"mail server busy sending the receipt of {order_id}")
        self.db.execute("INSERT OR IGNORE INTO emails VALUES (?, ?)", (key, order_id))


async def serve(folder: Path, orders: list[Order], kill_at: int | None, log: str) -> int:
    outside = Outside(folder / "outside.db")
    shipped = 0
    config = BusConfig(
        retry=RetryPolicy(max_attempts=8, initial_delay=0.01, max_delay=0.2),
        workflow_concurrency=64,
    )
    async with Bus.open(log, config=config) as bus:
        revenue = reduce(
            bus,
            "order.charged",
            name="revenue",
            fn=add_amount,
            initial=0,
        )

        async def reserve(order: Order) -> Reservation:
            return Reservation(order.id, int(order.sku.split("-")[1]))

        async def charge(order: Order, idempotency_key: str) -> str:
            charge_id = outside.charge(order, idempotency_key)
            # The outbox of a step: a publish keyed by the step's idempotency key
            # is in the log once, however often the step runs.
            await bus.publish(
                "order.charged",
                {"order": order.id, "amount": order.amount},
                key=order.customer,
                idempotency_key=idempotency_key,
            )
            if kill_at is not None and shipped >= kill_at:
                print(f"-- SIGKILL inside the charge step of {order.id} --", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return charge_id

        async def ship(order: Order, reservation: Reservation) -> Shipment:
            nonlocal shipped
            shipment = Shipment(order.id, f"trk-{order.id}-{reservation.bin}")
            await bus.publish(
                "order.shipped",
                order.id,
                key=order.customer,
                idempotency_key=current_step().idempotency_key,
            )
            shipped += 1
            return shipment

        @bus.workflow("fulfil")
        async def fulfil(wf: Workflow, order: Order) -> Shipment:
            reservation = await wf.step("reserve", reserve, order)
            await wf.step("charge", charge, order)
            return await wf.step("ship", ship, order, reservation)

        @bus.subscribe("orders", name="fulfilment")
        async def on_order(event: Event[dict[str, object]], ctx: Context) -> None:
            await bus.start_workflow("fulfil", event.payload, workflow_id=event.id)

        @bus.subscribe("order.shipped", name="email")
        async def email(event: Event[str], ctx: Context) -> None:
            outside.send_mail(event.payload, ctx.idempotency_key, ctx.attempt)

        receipts = await bus.publish_many(
            Message("orders", order, key=order.customer, idempotency_key=order.id)
            for order in orders
        )
        await bus.drain(timeout=120)  # every order has its workflow
        resumed = 0
        for receipt in receipts:
            handle = await bus.get_workflow(receipt.id)
            await handle.result(timeout=120)
            resumed += (await handle.status()).runs > 1
        await bus.drain(timeout=120)  # emails and revenue caught up

        report = await bus.reconcile()
        totals = {key: value async for key, value in revenue.items()}
    print(f"workflow runs resumed after the kill: {resumed} (finished steps not run again)")
    return check(outside, orders, totals, report)


def check(
    outside: Outside,
    orders: list[Order],
    totals: dict[str, int],
    report: object,
) -> int:
    db = outside.db
    charged = dict(db.execute("SELECT orderid, amount FROM charges"))
    charge_requests = db.execute("SELECT count(*) FROM requests WHERE service='charge'").fetchone()
    mailed = {row[0] for row in db.execute("SELECT orderid FROM emails")}
    mail_requests = db.execute("SELECT count(*) FROM requests WHERE service='email'").fetchone()
    expected: dict[str, int] = {}
    for order in orders:
        expected[order.customer] = expected.get(order.customer, 0) + order.amount

    problems = []
    if charged != {o.id: o.amount for o in orders}:
        problems.append(f"charges: {len(charged)} orders charged, {len(orders)} expected")
    if mailed != {o.id for o in orders}:
        problems.append(f"emails: {len(mailed)} sent, {len(orders)} expected")
    if totals != expected:
        problems.append("revenue per customer differs from the orders")
    if not getattr(report, "ok", False):
        problems.append("reconciliation found lost events")

    print()
    print(f"orders                  {len(orders)}")
    print(
        f"charged                 {len(charged)} orders, once each "
        f"({charge_requests[0]} gateway requests: timeouts retried, and the charge "
        "interrupted by the kill repeated with its idempotency key)"
    )
    print(f"receipts emailed        {len(mailed)} ({mail_requests[0]} attempts via the retry lane)")
    print(
        f"revenue per customer    {'matches' if totals == expected else 'DIFFERS FROM'} "
        f"the orders ({len(totals)} customers, {sum(totals.values())} in all)"
    )
    print()
    print(report)
    print()
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    print("OK: every order fulfilled exactly once across a kill -9; reconciliation clean")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--dir", type=Path, help="where the log and outside files go")
    parser.add_argument(
        "--log", help="the log a run opens (default: orders.db in --dir; or a PostgreSQL URL)"
    )
    parser.add_argument(
        "--move-to",
        metavar="POSTGRES_URL",
        help="after the kill, move the log there with `eventbus migrate`; run 2 goes on there",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kill-at", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    orders = make_orders(args.orders)
    if args.child:
        from eventbus import run

        # Retries are logged one by one at WARNING; the summary below counts them.
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
        log = args.log or str(args.dir / "orders.db")
        return int(run(serve(args.dir, orders, args.kill_at, log)))

    folder = args.dir or Path(tempfile.mkdtemp(prefix="fulfilment-"))
    folder.mkdir(parents=True, exist_ok=True)
    log = args.log or str(folder / "orders.db")
    child = [
        sys.executable,
        __file__,
        "--child",
        "--dir",
        str(folder),
        "--orders",
        str(args.orders),
    ]
    print(f"log: {log}")
    print(f"run 1: fulfilling {args.orders} orders; it will kill itself half-way")
    first = subprocess.run([*child, "--log", log, "--kill-at", str(args.orders // 2)], check=False)
    if first.returncode != -signal.SIGKILL:
        print(f"FAILED: the first run should have died by SIGKILL, exit code {first.returncode}")
        return 1
    print("run 1: killed (SIGKILL)")
    if args.move_to:
        print("moving the log: eventbus migrate (the deaths of run 1 are charged on the way)")
        moved = subprocess.run(
            [sys.executable, "-m", "eventbus", "migrate", log, args.move_to], check=False
        )
        if moved.returncode != 0:
            print(f"FAILED: eventbus migrate exited with {moved.returncode}")
            return 1
        log = args.move_to
        print("run 2: opening the moved log; unfinished workflows resume there by themselves")
    else:
        print("run 2: reopening the log; unfinished workflows resume by themselves")
    return subprocess.run([*child, "--log", log], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
