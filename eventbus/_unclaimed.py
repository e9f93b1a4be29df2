"""Subscriptions the log knows that no handler on this bus claims: a warning once the
bus has started, and dropping one when the command line asks.

A subscription stays in the log under its name after its handler is renamed (its
name defaulted to the handler's qualified name) or removed. Its cursor then stops,
and compaction, which keeps every event some subscription has not finished, never
deletes anything again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import storage as _storage
from storage import WORKFLOW_PREFIX

from ._errors import translate_storage_error
from ._logging import get_logger

if TYPE_CHECKING:
    from ._bus import Bus

logger = get_logger("bus")


def unclaimed(bus: Bus) -> list[str]:
    """Names of the subscriptions in the log at open that no handler of ``bus`` runs."""
    return sorted(
        name
        for name in bus._known
        if name not in bus._subs and not name.startswith(WORKFLOW_PREFIX)
    )


async def warn_unclaimed(bus: Bus) -> None:
    """Log a warning for each subscription of the log that no handler claims.

    Run as a task of the bus: it starts at the first await of the body of
    ``Bus.open``, so the subscriptions made before it count as claimed.
    """
    head = bus._writer.committed_head
    for name in unclaimed(bus):
        cursor = bus._known[name].cursor
        logger.warning(
            "subscription %r is in the log (cursor %d, up to %d events behind) but no "
            "handler on this bus claimed it when it started; compaction keeps every event "
            "after its cursor while it stays. If its handler was renamed or removed, drop "
            "it: `eventbus subscriptions drop FILE %s` (subscribe before the first await "
            "after Bus.open to claim it in time)",
            name,
            cursor,
            max(0, head - cursor),
            name,
            extra={"subscription": name},
        )


async def apply_drop(bus: Bus, name: str | None) -> None:
    """Drop the subscription ``name`` from the log, as the command line queued it,
    unless a handler of ``bus`` runs it. Logs what it did; never raises for a
    refusal."""
    if name is None:
        logger.error("ignoring a queued drop command that names no subscription")
        return
    if name in bus._subs:
        logger.warning(
            "refused a queued drop of subscription %r: a handler on this bus runs it",
            name,
            extra={"subscription": name},
        )
        return
    try:
        async with bus._writer.lock:
            existed = await bus._log.drop_subscription(name)
    except _storage.StorageError as exc:
        raise translate_storage_error(exc) from exc
    bus._known.pop(name, None)
    logger.warning(
        "applied a queued drop of subscription %r%s",
        name,
        "" if existed else ": it was not in the log",
        extra={"subscription": name},
    )
