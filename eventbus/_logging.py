"""The bus's logger names, and the structured fields of records about one event.

Every logger sits under ``eventbus``, so ``logging.getLogger("eventbus")`` configures
them all. A record about one event of one subscription (a retry, a dead letter)
carries ``subscription``, ``event_id``, ``seq`` and ``attempt`` as attributes, set
with ``extra=event_fields(...)``, so a JSON formatter or a filter can use them
without parsing the message.
"""

from __future__ import annotations

import logging

#: Each logger the bus writes to, and what it says there.
LOGGERS: dict[str, str] = {
    "eventbus.bus": "opening and closing, commands queued by the command line, "
    "compaction, subscriptions in the log that no handler claims, new subscriptions "
    "about to replay a long log",
    "eventbus.dispatch": "subscriptions: retries and failed batches split in halves (INFO), "
    "dead letters and circuit-breaker changes (WARNING), events found in flight after a "
    "crash",
    "eventbus.publish": "the log writer: group commits that failed, or were committed "
    "again in parts over one refused record",
    "eventbus.storage": "the SQLite log: a busy file, WAL checkpoints",
    "eventbus.workflows": "workflow runs: failed steps, runs that fail or resume",
    "eventbus.reconcile": "reconciliation passes and user reconcilers",
    "eventbus.hooks": "hooks: an after_publish hook that raised (the event was published)",
    "eventbus.dashboard": "the web dashboard: a change started from it that failed",
}

#: The attributes :func:`event_fields` sets on a log record.
EVENT_FIELDS: tuple[str, ...] = ("subscription", "event_id", "seq", "attempt")


def get_logger(part: str) -> logging.Logger:
    """The logger ``eventbus.<part>``; ``part`` is one of those in :data:`LOGGERS`."""
    name = f"eventbus.{part}"
    if name not in LOGGERS:
        raise ValueError(f"no logger {name!r}; the bus logs to {', '.join(LOGGERS)}")
    return logging.getLogger(name)


def event_fields(subscription: str, event_id: str, seq: int, attempt: int) -> dict[str, object]:
    """The ``extra=`` of a record about one event of one subscription:
    ``logger.info("...", ..., extra=event_fields(sub, event.id, event.seq, attempt))``.

    Args:
        subscription: The subscription's name.
        event_id: The event's id.
        seq: The event's position in the log.
        attempt: The attempt the record is about (1 for the first).
    """
    return {"subscription": subscription, "event_id": event_id, "seq": seq, "attempt": attempt}
