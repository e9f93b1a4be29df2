"""An in-memory log: the same contract as SQLite, no durability, for tests and ``:memory:``."""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

import msgspec

from ._calls import CallSlots, NoCallSlots
from ._errors import StorageClosed
from ._types import (
    WORKFLOW_PREFIX,
    DeadRecord,
    LogStats,
    NewRecord,
    Receipt,
    Record,
    RetryRecord,
    StepRecord,
    SubscriptionInfo,
    Unaccounted,
    WorkflowRecord,
    WriteBatch,
    overrides,
    plain_commit,
)


class _Ranges:
    """Disjoint, sorted ranges [lo, hi] of seq; adjacent ones merge."""

    __slots__ = ("his", "los")

    def __init__(self) -> None:
        self.los: list[int] = []
        self.his: list[int] = []

    def add(self, lo: int, hi: int) -> None:
        los, his = self.los, self.his
        i = bisect.bisect_left(his, lo - 1)
        j = i
        while j < len(los) and los[j] <= hi + 1:
            lo, hi = min(lo, los[j]), max(hi, his[j])
            j += 1
        los[i:j] = [lo]
        his[i:j] = [hi]

    def covers(self, seq: int) -> bool:
        i = bisect.bisect_left(self.his, seq)
        return i < len(self.los) and self.los[i] <= seq


class MemoryStorage:
    """A log kept in process memory. Lost when the process exits.

    Events are kept until :meth:`compact` removes them, so memory grows with the
    backlog exactly as the SQLite file would.
    """

    def __init__(self) -> None:
        # A list indexed by seq - first_seq (seqs are dense between compactions):
        # O(1) positioning for reads, where a deque would walk from an end.
        # The events in the log, in order: their seqs are dense, the last one the head
        # (see _first_seq). Kept as appended; read() makes the Records it returns.
        self._events: list[NewRecord] = []
        self._head = 0
        self._idempotency: dict[str, tuple[Receipt, float]] = {}
        self._subs: dict[str, SubscriptionInfo] = {}
        self._dead: dict[tuple[str, int], DeadRecord] = {}
        self._retries: dict[tuple[str, int], RetryRecord] = {}
        self._state: dict[str, dict[str, bytes]] = {}
        self._effects: dict[str, tuple[bytes, float]] = {}
        self._acked: dict[str, _Ranges] = {}
        # Per subscription, the seqs in its retry lane and dead letters (sorted, one
        # entry per place it is held), so an acknowledgement finds its holes by bisection.
        self._held: dict[str, list[int]] = {}
        self._workflows: dict[str, WorkflowRecord] = {}
        self._workflow_num = 0
        self._steps: dict[str, dict[int, StepRecord]] = {}
        self._closed = False
        self._plain = False  # set by open(): see commit_now
        self._appends_now = False  # likewise: see append_now

    @property
    def head(self) -> int:
        return self._head

    @property
    def commits_now(self) -> bool:
        return self._plain

    @property
    def appends_now(self) -> bool:
        return self._appends_now

    async def open(self) -> None:
        self._closed = False
        self._plain = plain_commit(self, MemoryStorage)
        # An append at once passes by commit and commit_now: only while neither is
        # put in the way, or where a subclass takes append_now over too (it then
        # sees those appends itself).
        self._appends_now = (
            self._plain and not overrides(self, MemoryStorage, "commit_now")
        ) or overrides(self, MemoryStorage, "append_now")

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed("the in-memory log is closed")

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        return self._apply(batch)

    def commit_now(self, batch: WriteBatch) -> list[Receipt] | None:
        """Commit ``batch`` at once (there is no I/O); None, with nothing written,
        when a subclass overrides :meth:`commit` (it must see every commit)."""
        if not self._plain:
            return None
        return self._apply(batch)

    def append_now(self, record: NewRecord) -> Receipt | None:
        """:meth:`commit` of ``record`` alone, at a fraction of its cost; None
        (nothing written) for a record with an idempotency key, on a closed log, or
        when a subclass overrides :meth:`commit` or :meth:`commit_now` (and not
        this method too)."""
        if not self._appends_now or self._closed or record.idempotency_key is not None:
            return None
        seq = self._head = self._head + 1
        self._events.append(record)
        return Receipt(seq, record.id)

    def _apply(self, batch: WriteBatch) -> list[Receipt]:
        self._check_open()
        receipts: list[Receipt] = []
        now = time.time()
        seq = self._head
        new: list[NewRecord] = []
        fresh_keys: dict[str, Receipt] = {}
        for rec in batch.appends:
            ikey = rec.idempotency_key
            if ikey is not None:
                known = fresh_keys.get(ikey)
                if known is None and ikey in self._idempotency:
                    known = self._idempotency[ikey][0]
                if known is not None:
                    receipts.append(Receipt(known.seq, known.id, True))
                    continue
            seq += 1
            new.append(rec)
            receipt = Receipt(seq, rec.id)
            if ikey is not None:
                fresh_keys[ikey] = receipt
            receipts.append(receipt)
        # Nothing above can fail half-way through a mutation: apply all at once.
        self._events.extend(new)
        self._head = seq
        for ikey, receipt in fresh_keys.items():
            self._idempotency[ikey] = (receipt, now)
        if not (
            batch.acks
            or batch.subscriptions
            or batch.retries
            or batch.settled
            or batch.dead
            or batch.state
            or batch.effects
            or batch.done
            or batch.workflow_starts
            or batch.workflows
            or batch.steps
        ):
            return receipts  # appends only
        prev = {name: (s.cursor if (s := self._subs.get(name)) else 0) for name in batch.acks}
        for info in batch.subscriptions:
            old = self._subs.get(info.name)
            if old is None:
                self._subs[info.name] = SubscriptionInfo(info.name, info.topics, info.cursor, now)
                if info.cursor > 0:
                    self._ranges(info.name).add(1, info.cursor)
            else:
                self._subs[info.name] = msgspec.structs.replace(old, topics=info.topics)
        for name, cursor in batch.acks.items():
            old = self._subs.get(name)
            if old is None:
                self._subs[name] = SubscriptionInfo(name, ("*",), cursor, now)
            elif cursor > old.cursor:
                self._subs[name] = msgspec.structs.replace(old, cursor=cursor, updated_at=now)
        for retry in batch.retries:
            key = (retry.subscription, retry.record.seq)
            if key not in self._retries:
                self._hold(key)
            self._retries[key] = retry
        for key in batch.settled:
            if self._retries.pop(key, None) is not None:
                self._release(key)
        for dead in batch.dead:
            key = (dead.subscription, dead.record.seq)
            if key not in self._dead:
                self._hold(key)
            self._dead[key] = dead
        for sub, state_key, value in batch.state:
            table = self._state.setdefault(sub, {})
            if value is None:
                table.pop(state_key, None)
            else:
                table[state_key] = value
        for effect_key, result in batch.effects:
            self._effects.setdefault(effect_key, (result, now))
        dead_now = {(d.subscription, d.record.seq) for d in batch.dead}
        for key in batch.settled:
            if key not in dead_now:
                self._ranges(key[0]).add(key[1], key[1])
        for name, cursor in batch.acks.items():
            if cursor > prev[name]:
                self._ack_ranges(name, prev[name], cursor)
        for name, lo, hi in batch.done:
            self._ranges(name).add(lo, hi)
        for run in batch.workflow_starts:
            if run.id not in self._workflows:
                self._workflow_num += 1
                self._workflows[run.id] = msgspec.structs.replace(run, num=self._workflow_num)
        for run in batch.workflows:
            old_run = self._workflows.get(run.id)
            if old_run is None:
                self._workflow_num += 1
                num, created = self._workflow_num, run.created_at
            elif old_run.status != "running":
                continue  # a late write cannot undo a cancel or a finish
            else:
                num, created = old_run.num, old_run.created_at
            self._workflows[run.id] = msgspec.structs.replace(run, num=num, created_at=created)
        for step in batch.steps:
            self._steps.setdefault(step.workflow_id, {})[step.position] = step
        return receipts

    def _ranges(self, subscription: str) -> _Ranges:
        ranges = self._acked.get(subscription)
        if ranges is None:
            ranges = self._acked[subscription] = _Ranges()
        return ranges

    def _hold(self, key: tuple[str, int]) -> None:
        bisect.insort(self._held.setdefault(key[0], []), key[1])

    def _release(self, key: tuple[str, int]) -> None:
        held = self._held.get(key[0], [])
        i = bisect.bisect_left(held, key[1])
        if i < len(held) and held[i] == key[1]:
            del held[i]

    def _ack_ranges(self, name: str, prev: int, cursor: int) -> None:
        held = self._held.get(name, [])
        lo_i, hi_i = bisect.bisect_right(held, prev), bisect.bisect_right(held, cursor)
        holes = sorted(set(held[lo_i:hi_i]))
        ranges = self._ranges(name)
        lo = prev + 1
        for hole in holes:
            if hole > lo:
                ranges.add(lo, hole - 1)
            lo = hole + 1
        if lo <= cursor:
            ranges.add(lo, cursor)

    async def finished_ahead(self, subscription: str, after: int) -> list[tuple[int, int]]:
        self._check_open()
        ranges = self._ranges(subscription)
        out = [
            (max(lo, after + 1), hi)
            for lo, hi in zip(ranges.los, ranges.his, strict=True)
            if hi > after
        ]
        out.extend((seq, seq) for sub, seq in self._dead if sub == subscription and seq > after)
        return sorted(out)

    def calls(self, subscription: str, slots: int, width: int) -> CallSlots:
        """Nothing outlives the process here: no call needs remembering."""
        return NoCallSlots()

    async def read(
        self, after: int, upto: int, topics: frozenset[str] | None, limit: int
    ) -> list[Record]:
        self._check_open()
        events = self._events
        if not events or limit <= 0:
            return []
        first = self._first_seq()
        start = max(after + 1 - first, 0)
        stop = max(start, min(upto + 1 - first, len(events)))
        if topics is None or "*" in topics:
            stop = min(stop, start + limit)
            return [_record(first + i, events[i]) for i in range(start, stop)]
        out: list[Record] = []
        for i in range(start, stop):
            rec = events[i]
            if rec.topic in topics:
                out.append(_record(first + i, rec))
                if len(out) >= limit:
                    break
        return out

    def _first_seq(self) -> int:
        """The seq of ``_events[0]``: they are dense and end at the head."""
        return self._head - len(self._events) + 1

    async def subscriptions(self) -> dict[str, SubscriptionInfo]:
        self._check_open()
        return dict(self._subs)

    def _dead_matching(
        self,
        subscription: str | None,
        error_type: str | None,
        since: float | None,
        until: float | None,
        ids: Sequence[str] | None,
    ) -> list[DeadRecord]:
        rows = [
            d
            for d in self._dead.values()
            if (subscription is None or d.subscription == subscription)
            and (
                error_type is None
                or d.error_type == error_type
                or d.error_type.endswith("." + error_type)
            )
            and (since is None or d.last_failed_at >= since)
            and (until is None or d.last_failed_at < until)
            and (ids is None or d.record.id in ids)
        ]
        rows.sort(key=lambda d: (d.record.seq, d.subscription))
        return rows

    async def dead_letters(
        self,
        subscription: str | None = None,
        limit: int = 100,
        after_seq: int = 0,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
        after_subscription: str | None = None,
    ) -> list[DeadRecord]:
        self._check_open()
        rows = self._dead_matching(subscription, error_type, since, until, ids)
        if after_subscription is None:
            return [d for d in rows if d.record.seq > after_seq][:limit]
        start = (after_seq, after_subscription)
        return [d for d in rows if (d.record.seq, d.subscription) > start][:limit]

    async def count_dead_letters(
        self,
        subscription: str | None = None,
        *,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
    ) -> int:
        self._check_open()
        return len(self._dead_matching(subscription, error_type, since, until, ids))

    async def get_state(self, subscription: str, keys: Sequence[str]) -> dict[str, bytes]:
        self._check_open()
        table = self._state.get(subscription, {})
        return {k: table[k] for k in keys if k in table}

    async def state_items(
        self, subscription: str, after: str = "", limit: int = 1000
    ) -> list[tuple[str, bytes]]:
        self._check_open()
        table = self._state.get(subscription, {})
        return [(k, table[k]) for k in sorted(k for k in table if k > after)[:limit]]

    async def get_effect(self, key: str) -> bytes | None:
        self._check_open()
        found = self._effects.get(key)
        return None if found is None else found[0]

    async def retries(self, subscription: str) -> list[RetryRecord]:
        self._check_open()
        return sorted(
            (r for (sub, _), r in self._retries.items() if sub == subscription),
            key=lambda r: r.record.seq,
        )

    async def redrive(
        self,
        subscription: str | None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        due_at: float,
        spacing: float = 0.0,
        limit: int = 1_000_000,
    ) -> list[RetryRecord]:
        self._check_open()
        rows = self._dead_matching(subscription, error_type, None, None, ids)[:limit]
        out = [
            RetryRecord(d.subscription, d.record, 1, due_at + i * spacing)
            for i, d in enumerate(rows)
        ]
        now = time.time()
        for r in out:
            del self._dead[(r.subscription, r.record.seq)]
            self._release((r.subscription, r.record.seq))
            if not r.subscription.startswith(WORKFLOW_PREFIX):
                if (r.subscription, r.record.seq) not in self._retries:
                    self._hold((r.subscription, r.record.seq))
                self._retries[(r.subscription, r.record.seq)] = r
                continue
            run = self._workflows.get(r.record.id)
            if run is not None and run.status == "failed":
                self._workflows[run.id] = msgspec.structs.replace(
                    run,
                    status="running",
                    updated_at=now,
                    error_type="",
                    error_message="",
                    traceback="",
                )
                steps = self._steps.get(run.id, {})
                for pos in [p for p, st in steps.items() if st.status in ("fatal", "running")]:
                    del steps[pos]
        return out

    async def purge(
        self,
        subscription: str | None,
        *,
        ids: Sequence[str] | None = None,
        error_type: str | None = None,
        until: float | None = None,
    ) -> int:
        self._check_open()
        rows = self._dead_matching(subscription, error_type, None, until, ids)
        for d in rows:
            del self._dead[(d.subscription, d.record.seq)]
            self._release((d.subscription, d.record.seq))
            if not d.subscription.startswith(WORKFLOW_PREFIX):
                self._ranges(d.subscription).add(d.record.seq, d.record.seq)
        return len(rows)

    async def workflow(self, workflow_id: str) -> WorkflowRecord | None:
        self._check_open()
        return self._workflows.get(workflow_id)

    async def workflows(
        self,
        *,
        name: str | None = None,
        status: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[WorkflowRecord]:
        self._check_open()
        runs = sorted(self._workflows.values(), key=lambda w: w.num)
        return [
            w
            for w in runs
            if w.num > after
            and (name is None or w.name == name)
            and (status is None or w.status == status)
        ][:limit]

    async def count_workflows(self, *, name: str | None = None, status: str | None = None) -> int:
        self._check_open()
        return sum(
            1
            for w in self._workflows.values()
            if (name is None or w.name == name) and (status is None or w.status == status)
        )

    async def drop_subscription(self, name: str) -> bool:
        self._check_open()
        existed = self._subs.pop(name, None) is not None
        self._acked.pop(name, None)
        self._held.pop(name, None)
        self._state.pop(name, None)
        for table in (self._retries, self._dead):
            for key in [k for k in table if k[0] == name]:
                del table[key]
        return existed

    async def steps(self, workflow_id: str) -> list[StepRecord]:
        self._check_open()
        return sorted(self._steps.get(workflow_id, {}).values(), key=lambda st: st.position)

    async def unaccounted(self, subscription: str, upto: int, limit: int = 100) -> Unaccounted:
        self._check_open()
        info = self._subs.get(subscription)
        if info is None:
            return Unaccounted(subscription, 0, ())
        upto = min(upto, info.cursor)
        everything = "*" in info.topics
        ranges = self._ranges(subscription)
        events = self._events
        count = 0
        first: list[int] = []
        if not events:
            return Unaccounted(subscription, 0, ())
        base = self._first_seq()  # seqs are dense from here: index arithmetic
        # Only the gaps between acknowledged ranges can hold anything.
        gaps: list[tuple[int, int]] = []
        covered = base - 1
        for lo, hi in zip(ranges.los, ranges.his, strict=True):
            if covered >= upto:
                break
            if lo > covered + 1:
                gaps.append((covered + 1, min(lo - 1, upto)))
            covered = max(covered, hi)
        if covered < upto:
            gaps.append((covered + 1, upto))
        for a, b in gaps:
            start = max(a - base, 0)
            for i, rec in enumerate(events[start : max(b - base + 1, 0)], base + start):
                if not everything and rec.topic not in info.topics:
                    continue
                key = (subscription, i)
                if key in self._retries or key in self._dead:
                    continue
                count += 1
                if len(first) < limit:
                    first.append(i)
        return Unaccounted(subscription, count, tuple(first))

    async def take_control(self) -> list[tuple[int, bytes]]:
        return []

    async def done_control(self, ids: Sequence[int]) -> None:
        return None

    async def compact(
        self, upto: int, older_than: float, idempotency_older_than: float, limit: int = 10_000
    ) -> int:
        self._check_open()
        removed = 0
        events = self._events
        base = self._first_seq()
        while (
            removed < min(len(events), limit)
            and base + removed <= upto
            and events[removed].created_at < older_than
        ):
            removed += 1
        del events[:removed]
        stale = [k for k, (_, at) in self._idempotency.items() if at < idempotency_older_than]
        for k in stale:
            del self._idempotency[k]
        for k in [k for k, (_, at) in self._effects.items() if at < idempotency_older_than]:
            del self._effects[k]
        for run in list(self._workflows.values()):
            if run.status in ("completed", "cancelled") and run.updated_at < idempotency_older_than:
                del self._workflows[run.id]
                self._steps.pop(run.id, None)
        return removed

    async def stats(self, *, exact: bool = True) -> LogStats:
        self._check_open()
        lag: dict[str, int] = {}
        base = self._first_seq()
        for name, info in self._subs.items():
            if not exact:
                lag[name] = max(0, self._head - info.cursor)
                continue
            topics = set(info.topics)
            everything = "*" in topics
            i = min(max(info.cursor + 1 - base, 0), len(self._events))
            lag[name] = sum(1 for r in self._events[i:] if everything or r.topic in topics)
        dead: dict[str, int] = {}
        for d in self._dead.values():
            dead[d.subscription] = dead.get(d.subscription, 0) + 1
        retries: dict[str, int] = {}
        for sub, _ in self._retries:
            retries[sub] = retries.get(sub, 0) + 1
        return LogStats(
            head=self._head,
            events=len(self._events),
            oldest_seq=base if self._events else None,
            subscriptions=tuple(sorted(self._subs.values(), key=lambda s: s.name)),
            lag=lag,
            dead_letters=dead,
            size_bytes=sum(len(r.payload) for r in self._events),
            wal_bytes=0,
            retries=retries,
        )


def _record(seq: int, rec: NewRecord) -> Record:
    return Record(seq, rec.id, rec.topic, rec.key, rec.payload, rec.headers, rec.created_at)
