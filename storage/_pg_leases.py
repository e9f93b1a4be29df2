"""Several processes on one PostgreSQL log: partitions, their leases, and the calls
in flight that a process taking a partition over charges.

Every event falls in one of the log's partitions (its key's hash; its seq when it has
no key: see ``_pg_schema``), and each subscription keeps a cursor per partition. A
process dispatches a subscription's events of the partitions it holds a lease on,
and only those:

- **Membership and fair shares.** Each process subscribed beats every third of the
  lease time (:func:`heartbeat`): it renews the leases it holds, says it is alive
  (``members``), and learns its fair share: the partitions divided evenly among the
  live members, in the order of their ids. One over its share gives partitions up
  (after finishing their calls in flight: :func:`release`); one under it takes free
  ones (:func:`acquire`). A member joining or a partition given up is announced on
  the log's channel, so the others act at once rather than at their next beat.
- **Leases and fencing.** A lease runs until ``expires_at`` by the database's clock
  (never a process's), and each grant bumps the partition's ``epoch``. Every write
  of a subscription's handling (acknowledgement, state, outbox, retries, dead
  letters) carries the lease it was made under and runs the schema's ``fence`` first,
  in the same transaction: unless every partition is still held at that epoch and
  unexpired, nothing is written. ``fence`` locks the lease rows to the end of the
  transaction, so a takeover waits for a commit that passed it; a process paused
  past its lease (``SIGSTOP``, a long GC, a network cut) can therefore never
  acknowledge or write state once another has taken over.
- **Takeover.** A partition whose holder's lease expired is free (so is one whose
  holder ran on this host and is gone: a restart after a ``kill -9`` does not wait
  for the lease). Its taker first
  charges a death (``eventbus.ProcessDied``, one failed attempt) to every event of it
  whose handler call the holder had started and not finished: each call is written
  to ``calls`` before it starts (:func:`mark_call`). So an event that kills every
  process that handles it is dead-lettered after ``max_attempts`` deaths in all,
  wherever they happened. A partition given up on purpose is taken with no charge.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

from ._pg_batch import EVENT_COLUMNS, RETRY_COLUMNS, UPSERT_RETRY, retry_from_row, retry_row
from ._types import PROCESS_DIED, Claim, Lease, Record, RetryRecord, Share

if TYPE_CHECKING:
    import asyncpg

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"

_INTERVAL = "$3 * interval '1 second'"

# Lock order: every statement that locks several rows of ``partitions`` and waits
# for them locks them by (subscription, part), as the schema's ``fence`` does: a
# process's acknowledgements and its own heartbeat lock the same lease rows, and in
# two orders they deadlock. (Taking free partitions skips locked rows: it never waits.)


def new_member() -> str:
    """A name for this process's life on a log, unique among all processes ever."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{os.urandom(4).hex()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def gone_here(members: Sequence[str]) -> list[str]:
    """The members that ran on this host and whose process is gone (killed): their
    leases need not be waited out."""
    host = socket.gethostname()[:40]
    gone: list[str] = []
    for member in members:
        name, _, rest = member.rpartition(":")
        where, _, pid = name.rpartition(":")
        if where == host and pid.isdigit() and rest and not _alive(int(pid)):
            gone.append(member)
    return gone


def fair_share(members: Sequence[str], me: str, partitions: int) -> int:
    """How many of ``partitions`` ``me`` should hold among ``members`` (live, ``me``
    counted even if not listed yet): an even split, the remainder going to the first
    members in id order."""
    ordered = sorted({*members, me})
    n = len(ordered)
    rank = ordered.index(me)
    return partitions // n + (1 if rank < partitions % n else 0)


async def heartbeat(
    conn: Connection, sub: str, member: str, seconds: float, lease: Lease | None, partitions: int
) -> tuple[Share, bool]:
    """Renew ``lease`` (what of it is still held), say ``member`` is alive, and learn
    its fair share. Returns the share, and whether the member is new (its arrival is
    to be announced). Run it in a transaction."""
    joined = await conn.fetchval(
        "INSERT INTO members (subscription, member, expires_at)"
        f" VALUES ($1, $2, clock_timestamp() + {_INTERVAL})"
        " ON CONFLICT (subscription, member) DO UPDATE SET expires_at = excluded.expires_at"
        " RETURNING xmax = 0",
        sub,
        member,
        seconds,
    )
    held: tuple[int, ...] = ()
    if lease is not None and lease.partitions:
        # Rows locked in the order fence locks them (see the lock order above).
        rows = await conn.fetch(
            "WITH held AS MATERIALIZED (SELECT part FROM partitions"
            " WHERE subscription = $1 AND owner = $2 AND expires_at > clock_timestamp()"
            " AND (part, epoch) IN (SELECT * FROM unnest($4::integer[], $5::bigint[]))"
            " ORDER BY part FOR NO KEY UPDATE)"
            f" UPDATE partitions p SET expires_at = clock_timestamp() + {_INTERVAL}"
            " FROM held WHERE p.subscription = $1 AND p.part = held.part"
            " RETURNING p.part",
            sub,
            member,
            seconds,
            list(lease.partitions),
            list(lease.epochs),
        )
        held = tuple(sorted(int(r[0]) for r in rows))
    members = [
        str(r[0])
        for r in await conn.fetch(
            "SELECT member FROM members WHERE subscription = $1 AND expires_at > clock_timestamp()",
            sub,
        )
    ]
    gone = gone_here([m for m in members if m != member])
    if gone:
        await conn.execute(
            "DELETE FROM members WHERE subscription = $1 AND member = ANY($2::text[])", sub, gone
        )
        members = [m for m in members if m not in gone]
    free = await conn.fetchval(
        "SELECT count(*) FROM partitions WHERE subscription = $1"
        " AND (owner IS NULL OR expires_at <= clock_timestamp() OR owner = ANY($2::text[]))",
        sub,
        gone_here(await _owners(conn, sub, member)),
    )
    head = await conn.fetchval("SELECT seq FROM head")
    # Housekeeping: members long gone, and the calls of processes that hold nothing
    # of the subscription any more (whoever took their partitions charged them).
    await conn.execute(
        "DELETE FROM members WHERE subscription = $1"
        " AND expires_at < clock_timestamp() - interval '10 minutes'",
        sub,
    )
    await conn.execute(
        "DELETE FROM calls c WHERE c.subscription = $1 AND c.member <> $2 AND NOT EXISTS"
        " (SELECT 1 FROM partitions p WHERE p.subscription = c.subscription"
        " AND p.owner = c.member)",
        sub,
        member,
    )
    share = Share(
        held=held,
        target=fair_share(members, member, partitions),
        free=int(free),
        members=len({*members, member}),
        head=int(head),
    )
    return share, bool(joined)


async def acquire(
    conn: Connection, sub: str, member: str, seconds: float, want: int, now: float
) -> tuple[Claim, int]:
    """Take up to ``want`` free partitions of ``sub`` for ``member``, charging the
    deaths of those whose holder's lease expired; returns everything ``member`` holds
    now, and how many deaths were charged. Run it in a transaction."""
    charged = 0
    taken_over: list[int] = []
    if want > 0:
        # Free: given up, expired, or held by a process of this host that is gone.
        rows = await conn.fetch(
            "WITH cand AS (SELECT part, owner, epoch FROM partitions"
            " WHERE subscription = $1 AND (owner IS NULL OR expires_at <= clock_timestamp()"
            " OR owner = ANY($5::text[])) ORDER BY part LIMIT $4 FOR UPDATE SKIP LOCKED)"
            " UPDATE partitions p SET owner = $2, epoch = p.epoch + 1,"
            f" expires_at = clock_timestamp() + {_INTERVAL}"
            " FROM cand WHERE p.subscription = $1 AND p.part = cand.part"
            " RETURNING p.part, cand.owner, cand.epoch",
            sub,
            member,
            seconds,
            want,
            gone_here(await _owners(conn, sub, member)),
        )
        expired: dict[str, dict[int, int]] = {}  # old holder -> {partition: epoch}
        for part, old_owner, old_epoch in rows:
            if old_owner is not None:  # else given up on purpose: nothing left running
                expired.setdefault(str(old_owner), {})[int(part)] = int(old_epoch)
                taken_over.append(int(part))
        for old_owner, epochs in expired.items():
            charged += await _charge_calls(conn, sub, old_owner, epochs, now)
    held = await conn.fetch(
        "SELECT part, epoch, cursor FROM partitions WHERE subscription = $1 AND owner = $2"
        " AND expires_at > clock_timestamp() ORDER BY part",
        sub,
        member,
    )
    lease = Lease(sub, member, tuple(int(r[0]) for r in held), tuple(int(r[1]) for r in held))
    claim = Claim(lease, tuple(int(r[2]) for r in held), tuple(sorted(taken_over)))
    return claim, charged


async def _owners(conn: Connection, sub: str, member: str) -> list[str]:
    """The other processes holding unexpired partitions of ``sub``."""
    rows = await conn.fetch(
        "SELECT DISTINCT owner FROM partitions WHERE subscription = $1 AND owner <> $2"
        " AND expires_at > clock_timestamp()",
        sub,
        member,
    )
    return [str(r[0]) for r in rows]


async def _charge_calls(
    conn: Connection, sub: str, member: str, epochs: dict[int, int], now: float
) -> int:
    """Charge the deaths of ``member``'s calls in flight in the partitions taken from
    it (``{partition: its epoch there}``), and forget those calls."""
    charged = 0
    for slot, seqs, attempts, parts, row_epochs in await conn.fetch(
        "SELECT slot, seqs, attempts, parts, epochs FROM calls"
        " WHERE subscription = $1 AND member = $2 FOR UPDATE",
        sub,
        member,
    ):
        kept: list[tuple[int, int, int, int]] = []
        for seq, attempt, part, epoch in zip(seqs, attempts, parts, row_epochs, strict=True):
            if epochs.get(part) == epoch:
                charged += await charge(conn, sub, int(part), int(seq), int(attempt), now)
            else:
                kept.append((int(seq), int(attempt), int(part), int(epoch)))
        if not kept:
            await conn.execute(
                "DELETE FROM calls WHERE subscription = $1 AND member = $2 AND slot = $3",
                sub,
                member,
                slot,
            )
        elif len(kept) < len(seqs):
            await conn.execute(
                "UPDATE calls SET seqs = $4, attempts = $5, parts = $6, epochs = $7"
                " WHERE subscription = $1 AND member = $2 AND slot = $3",
                sub,
                member,
                slot,
                *[list(column) for column in zip(*kept, strict=True)],
            )
    return charged


async def charge(conn: Connection, sub: str, part: int, seq: int, attempt: int, now: float) -> int:
    """Count a failed attempt (``ProcessDied``) for event ``seq`` of ``sub``, whose
    attempt ``attempt`` was running when its process died, unless its fate was
    recorded since. Returns 1 if charged."""
    row = await conn.fetchrow(
        "SELECT attempt FROM retries WHERE subscription = $1 AND seq = $2", sub, seq
    )
    if row is not None:
        if int(row[0]) != attempt:
            return 0  # that attempt's failure was recorded; a later one did not run
        await conn.execute(
            "UPDATE retries SET attempt = $1, due_at = $2, running = false,"
            " first_failed_at = coalesce(first_failed_at, $2), error_type = $3,"
            " error_message = $4, traceback = '' WHERE subscription = $5 AND seq = $6",
            attempt + 1,
            now,
            PROCESS_DIED,
            died(attempt),
            sub,
            seq,
        )
        return 1
    if attempt != 1:
        return 0  # it left the retry lane: settled or dead-lettered
    finished = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM dead_letters WHERE subscription = $1 AND seq = $2)"
        " OR EXISTS (SELECT 1 FROM acked WHERE subscription = $1 AND lo <= $2 AND hi >= $2)"
        " OR EXISTS (SELECT 1 FROM partitions WHERE subscription = $1 AND part = $3"
        " AND cursor >= $2)",
        sub,
        seq,
        part,
    )
    if finished:
        return 0
    event = await conn.fetchrow(f"SELECT {EVENT_COLUMNS} FROM events WHERE seq = $1", seq)
    if event is None:
        return 0
    record = RetryRecord(sub, Record(*event), 2, now, now, PROCESS_DIED, died(1))
    await conn.execute(UPSERT_RETRY, *retry_row(record))
    return 1


def died(attempt: int) -> str:
    return f"process died while handling (attempt {attempt})"


async def release(conn: Connection, sub: str, member: str, partitions: Sequence[int] | None) -> int:
    """Give up ``partitions`` of ``sub`` (all of them if None) held by ``member``,
    forgetting its calls in them; the next holder charges nothing. Returns how many
    were given up. Run it in a transaction."""
    status = await conn.execute(
        "WITH held AS MATERIALIZED (SELECT part FROM partitions"
        " WHERE subscription = $1 AND owner = $2 AND ($3::integer[] IS NULL OR part = ANY($3))"
        " ORDER BY part FOR NO KEY UPDATE)"  # in the order fence locks (see the lock order above)
        " UPDATE partitions p SET owner = NULL, expires_at = NULL"
        " FROM held WHERE p.subscription = $1 AND p.part = held.part",
        sub,
        member,
        None if partitions is None else list(partitions),
    )
    if partitions is None:
        # The calls of a process that holds nothing are forgotten (its rows of
        # partitions given up are too, at a heartbeat): none is charged.
        await conn.execute("DELETE FROM calls WHERE subscription = $1 AND member = $2", sub, member)
        await conn.execute(
            "DELETE FROM members WHERE subscription = $1 AND member = $2", sub, member
        )
    return int(status.rsplit(" ", 1)[-1])


async def announce(conn: Connection, subscription: str, *, retries: bool = False) -> None:
    """Tell every process listening on the log that the partitions or members of
    ``subscription`` changed (or, with ``retries``, that its retry lane was written
    outside its holders' handling: they read it again)."""
    await conn.execute(
        "SELECT pg_notify(log_channel(), $1)", ("r" if retries else "s") + subscription
    )


# One statement: the slot's row replaced. Each event's partition and that partition's
# epoch in the lease are worked out here rather than by the server (its md5 and a
# join with the partitions cost the server about 40 us of a call's 90 us here).
_MARK = (
    "INSERT INTO calls (subscription, member, slot, call, seqs, attempts, parts, epochs)"
    " VALUES ($1, $2, $3, $4, $5::bigint[], $6::integer[], $7::integer[], $8::bigint[])"
    " ON CONFLICT (subscription, member, slot) DO UPDATE SET call = excluded.call,"
    " seqs = excluded.seqs, attempts = excluded.attempts, parts = excluded.parts,"
    " epochs = excluded.epochs"
)


def partition_of(key: str | None, seq: int, partitions: int) -> int:
    """The partition of an event, as the schema's ``partition_of`` computes it: the
    first 32 bits of the md5 of its key, or its seq without a key."""
    if key is None:
        return seq % partitions
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % partitions


async def mark_call(
    conn: Connection,
    lease: Lease,
    partitions: int,
    slot: int,
    seqs: Sequence[int],
    attempts: Sequence[int],
    keys: Sequence[str | None],
    call: int,
) -> None:
    """Record that handler call number ``call``, of ``seqs`` (at ``attempts``, of
    ``keys``), starts in ``slot`` under ``lease``, replacing the slot's previous call.
    Each event is recorded with its partition's epoch in the lease: a takeover
    charges it only if that is the epoch it takes the partition over at (a lease lost
    meanwhile has an older one, or none: -1)."""
    epochs = dict(zip(lease.partitions, lease.epochs, strict=True))
    parts = [partition_of(k, s, partitions) for s, k in zip(seqs, keys, strict=True)]
    await conn.execute(
        _MARK,
        lease.subscription,
        lease.member,
        slot,
        call,
        list(seqs),
        list(attempts),
        parts,
        [epochs.get(p, -1) for p in parts],
    )


async def end_calls(conn: Connection, lease: Lease, calls: Sequence[tuple[int, int]]) -> None:
    """The calls ``(slot, call number)`` ended (returned or raised): no death can be
    blamed on them. A slot whose next call started already is left alone."""
    await conn.execute(
        "DELETE FROM calls WHERE subscription = $1 AND member = $2"
        " AND (slot, call) IN (SELECT * FROM unnest($3::integer[], $4::bigint[]))",
        lease.subscription,
        lease.member,
        [slot for slot, _ in calls],
        [call for _, call in calls],
    )


def _starts(claim: Claim, partitions: int) -> list[int]:
    """Each partition's start, by partition number (those not held: never read)."""
    starts = [2**62] * partitions
    for part, start in zip(claim.lease.partitions, claim.starts, strict=True):
        starts[part] = start
    return starts


async def read_claimed(
    conn: Connection,
    claim: Claim,
    partitions: int,
    after: int,
    upto: int,
    topics: frozenset[str] | None,
    limit: int,
) -> list[Record]:
    """Events with ``after < seq <= upto`` of the claim's partitions past each one's
    start, on ``topics`` (all if None), in order."""
    # part + 0: scan in seq order and filter (a partition is a fraction of the log),
    # never collect a whole backlog from the partition index to sort it.
    sql = (
        f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 AND seq <= $2"
        " AND part + 0 = ANY($3::integer[]) AND seq > ($4::bigint[])[part + 1]"
    )
    args: list[object] = [after, upto, list(claim.lease.partitions), _starts(claim, partitions)]
    if topics is not None and "*" not in topics:
        sql += " AND topic = ANY($5::text[])"
        args.append(sorted(topics))
    sql += f" ORDER BY seq LIMIT {int(limit)}"
    return [Record(*row) for row in await conn.fetch(sql, *args)]


async def claimed_retries(conn: Connection, lease: Lease) -> list[RetryRecord]:
    rows = await conn.fetch(
        f"SELECT {RETRY_COLUMNS} FROM retries WHERE subscription = $1"
        " AND part = ANY($2::integer[]) ORDER BY seq",
        lease.subscription,
        list(lease.partitions),
    )
    return [retry_from_row(r) for r in rows]


async def claimed_finished_ahead(
    conn: Connection, lease: Lease, after: int
) -> list[tuple[int, int]]:
    """Events past ``after`` the subscription finished: acknowledged ranges (each
    event of them is done, whatever its partition) and dead letters of the lease's
    partitions."""
    rows = await conn.fetch(
        "SELECT greatest(lo, $2 + 1), hi FROM acked WHERE subscription = $1 AND hi > $2"
        " UNION ALL SELECT seq, seq FROM dead_letters WHERE subscription = $1 AND seq > $2"
        " AND part = ANY($3::integer[]) ORDER BY 1, 2",
        lease.subscription,
        after,
        list(lease.partitions),
    )
    return [(int(lo), int(hi)) for lo, hi in rows]


async def progress(
    conn: Connection, sub: str, topics: frozenset[str], upto: int
) -> tuple[int, int]:
    """How far ``sub`` has finished the log up to ``upto`` in every partition (the
    seq below its first unfinished event, from the persisted cursors), and how many
    events wait in its retry lane."""
    topic_sql = "" if "*" in topics else " AND e.topic = ANY($3::text[])"
    args: list[object] = [sub, upto] if "*" in topics else [sub, upto, sorted(topics)]
    row = await conn.fetchrow(
        "SELECT min(coalesce((SELECT e.seq - 1 FROM events e WHERE e.part = p.part"
        f" AND e.seq > p.cursor AND e.seq <= $2{topic_sql} ORDER BY e.seq LIMIT 1), $2)),"
        " (SELECT count(*) FROM retries WHERE subscription = $1)"
        " FROM partitions p WHERE p.subscription = $1",
        *args,
    )
    if row is None or row[0] is None:
        return 0, 0
    return int(row[0]), int(row[1])
