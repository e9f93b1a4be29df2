"""What a reconciliation pass found: :class:`ReconcileReport` and its parts."""

from __future__ import annotations

import datetime

import msgspec

# Seqs listed per finding in a report (the counts are complete).
SHOWN = 20


class Repairs(msgspec.Struct, frozen=True):
    """What a pass repaired.

    Attributes:
        lost: Lost events re-dispatched through the retry lane.
        stuck: Events of stuck handler calls cancelled (each retried as a failed
            attempt).
        overdue: Overdue retries re-armed into the retry lane.
        workflows: Unfinished workflow runs resumed.
    """

    lost: int = 0
    stuck: int = 0
    overdue: int = 0
    workflows: int = 0

    @property
    def total(self) -> int:
        return self.lost + self.stuck + self.overdue + self.workflows

    def __add__(self, other: Repairs) -> Repairs:
        return Repairs(
            self.lost + other.lost,
            self.stuck + other.stuck,
            self.overdue + other.overdue,
            self.workflows + other.workflows,
        )


class SubscriptionReport(msgspec.Struct, frozen=True):
    """One subscription's accounts.

    Attributes:
        name: The subscription.
        topics: Its topics.
        registered: Subscribed on the bus that ran the pass (only those are
            repaired; one known only to the log is reported).
        head: The log's last seq.
        cursor: Every event of its topics up to here is done, retrying or
            dead-lettered (or lost).
        pending: Events of its topics after the cursor: not handled yet, buffered
            or in flight.
        retrying: Events in its retry lane (including those parked behind an earlier
            event of their key).
        overdue: Retries due more than the lease ago that nothing runs.
        dead: Its dead letters.
        lost: Events the cursor passed that are neither done, retrying nor
            dead-lettered; ``lost_seqs`` lists the first.
        stuck: Events held by handler calls running longer than the lease;
            ``stuck_seqs`` lists them.
        repaired: What the pass did about it.
    """

    name: str
    topics: tuple[str, ...]
    registered: bool
    head: int
    cursor: int
    pending: int
    retrying: int
    overdue: int
    dead: int
    lost: int
    lost_seqs: tuple[int, ...] = ()
    overdue_seqs: tuple[int, ...] = ()
    stuck: int = 0
    stuck_seqs: tuple[int, ...] = ()
    repaired: Repairs = msgspec.field(default_factory=Repairs)


class ReconcilerResult(msgspec.Struct, frozen=True):
    """The latest run of a user reconciler.

    Attributes:
        name: The reconciler.
        every: Seconds between its runs.
        runs: Runs so far.
        last_run_at: Unix time its latest run started; None before the first.
        duration: Seconds the latest run took.
        corrections: Corrective events its latest run published (not counting
            duplicates of an idempotency key).
        flags: Inconsistencies its latest run flagged (the first 100).
        flagged: How many it flagged.
        error: ``"Type: message"`` if the latest run raised, else None.
        total_corrections: Corrective events published by all its runs.
    """

    name: str
    every: float
    runs: int = 0
    last_run_at: float | None = None
    duration: float = 0.0
    corrections: int = 0
    flags: tuple[str, ...] = ()
    flagged: int = 0
    error: str | None = None
    total_corrections: int = 0


class ReconcileReport(msgspec.Struct, frozen=True):
    """The result of one reconciliation pass (``bus.reconcile()``, the periodic pass,
    or ``eventbus reconcile FILE``).

    Attributes:
        at: Unix time the pass started.
        duration: Seconds it took.
        head: The log's last seq.
        repair: Whether it repaired what it could.
        offline: Read from the file alone (no in-memory view: nothing is known to be
            in flight, so nothing is stuck).
        subscriptions: Per subscription, by name.
        reconcilers: The latest results of the user reconcilers.
        workflows_overdue: Unfinished workflow runs past their deadline (count);
            ``overdue_workflow_ids`` lists the first.
        workflows_resumed: Ids of unfinished workflow runs the pass resumed.
    """

    at: float
    duration: float
    head: int
    repair: bool
    offline: bool
    subscriptions: tuple[SubscriptionReport, ...]
    reconcilers: tuple[ReconcilerResult, ...] = ()
    workflows_overdue: int = 0
    overdue_workflow_ids: tuple[str, ...] = ()
    workflows_resumed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Nothing is lost."""
        return self.lost == 0

    @property
    def lost(self) -> int:
        return sum(s.lost for s in self.subscriptions)

    @property
    def stuck(self) -> int:
        return sum(s.stuck for s in self.subscriptions)

    @property
    def overdue(self) -> int:
        return sum(s.overdue for s in self.subscriptions)

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.subscriptions)

    @property
    def retrying(self) -> int:
        return sum(s.retrying for s in self.subscriptions)

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.subscriptions)

    @property
    def repaired(self) -> Repairs:
        total = Repairs(workflows=len(self.workflows_resumed))
        for s in self.subscriptions:
            total = total + s.repaired
        return total

    @property
    def flags(self) -> tuple[str, ...]:
        """Every flag of the reconcilers' latest runs, as ``"name: message"``."""
        return tuple(f"{r.name}: {flag}" for r in self.reconcilers for flag in r.flags)

    def subscription(self, name: str) -> SubscriptionReport:
        """The report of subscription ``name``.

        Raises:
            KeyError: No such subscription in the log.
        """
        for s in self.subscriptions:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON: every field, plus the totals and ``ok``."""
        data: dict[str, object] = msgspec.json.decode(msgspec.json.encode(self))
        data["ok"] = self.ok
        data["totals"] = {
            "pending": self.pending,
            "retrying": self.retrying,
            "overdue": self.overdue,
            "dead": self.dead,
            "lost": self.lost,
            "stuck": self.stuck,
            "repaired": msgspec.to_builtins(self.repaired),
        }
        return data

    def format(self) -> str:
        """A table for people: one line per subscription, then what was found and
        repaired, then the reconcilers."""
        when = datetime.datetime.fromtimestamp(self.at, datetime.UTC)
        verdict = "OK: nothing lost" if self.ok else f"LOST {self.lost} events"
        lines = [
            f"reconcile at {when:%Y-%m-%d %H:%M:%S} UTC ({self.duration:.3f}s), head "
            f"{self.head}{', from the file alone' if self.offline else ''}: {verdict}"
        ]
        if self.subscriptions:
            width = max(len("subscription"), *(len(s.name) for s in self.subscriptions))
            columns = ("cursor", "pending", "retrying", "overdue", "dead", "lost", "stuck")
            lines.append(
                f"{'subscription':<{width}}  "
                + "  ".join(f"{c:>8}" for c in columns)
                + ("" if self.offline else "  registered")
            )
            for s in self.subscriptions:
                values = (s.cursor, s.pending, s.retrying, s.overdue, s.dead, s.lost, s.stuck)
                lines.append(
                    f"{s.name:<{width}}  "
                    + "  ".join(f"{v:>8}" for v in values)
                    + ("" if self.offline else f"  {'yes' if s.registered else 'no'}")
                )
        else:
            lines.append("subscriptions (none)")
        for s in self.subscriptions:
            for what, count, seqs, fixed, verb in (
                ("lost", s.lost, s.lost_seqs, s.repaired.lost, "re-dispatched"),
                ("stuck", s.stuck, s.stuck_seqs, s.repaired.stuck, "cancelled and retried"),
                ("overdue", s.overdue, s.overdue_seqs, s.repaired.overdue, "re-armed"),
            ):
                if not count:
                    continue
                more = ", ..." if count > len(seqs) else ""
                if self.repair and s.registered:
                    outcome = f"{fixed} {verb}"
                elif s.registered:
                    outcome = "not repaired (repair=False)"
                else:
                    outcome = "not repaired: a bus where it is subscribed repairs it"
                lines.append(
                    f"  {s.name}: {count} {what} (seq {', '.join(map(str, seqs))}{more}); "
                    + outcome
                )
        if self.workflows_overdue:
            more = ", ..." if self.workflows_overdue > len(self.overdue_workflow_ids) else ""
            lines.append(
                f"  workflows past their deadline: {self.workflows_overdue} "
                f"({', '.join(self.overdue_workflow_ids)}{more})"
            )
        if self.workflows_resumed:
            lines.append(f"  workflow runs resumed: {', '.join(self.workflows_resumed)}")
        repaired = self.repaired
        if self.repair and repaired.total:
            lines.append(
                f"repaired: {repaired.lost} lost re-dispatched, {repaired.stuck} stuck "
                f"cancelled, {repaired.overdue} overdue re-armed, {repaired.workflows} "
                "workflow runs resumed"
            )
        if self.reconcilers:
            lines.append("reconcilers:")
            for r in self.reconcilers:
                status = f"error {r.error}" if r.error else "ok"
                lines.append(
                    f"  {r.name}: every {r.every:g}s, {r.runs} runs, latest "
                    f"{r.corrections} corrections, {r.flagged} flags, {status}"
                )
                lines.extend(f"    flag: {flag}" for flag in r.flags)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
