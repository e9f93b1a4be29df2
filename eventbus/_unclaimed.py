"""Subscriptions the log knows that no handler on this bus claims: a warning once the
bus has started, and dropping one when the command line asks.

A subscription stays in the log under its name after its handler is renamed (its
name defaulted to the handler's qualified name) or removed. Its cursor then stops,
and compaction, which keeps every event some subscription has not finished, never
deletes anything again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, MutableMapping

import eventbus.storage as _storage
from eventbus.storage import WORKFLOW_PREFIX, SubscriptionInfo

from ._errors import translate_storage_error
from ._logging import get_logger

logger = get_logger("bus")


def unclaimed(known: MutableMapping[str, SubscriptionInfo], running: Collection[str]) -> list[str]:
    """Names of the subscriptions in the log (``known`` at open) that no handler runs."""
    return sorted(
        name for name in known if name not in running and not name.startswith(WORKFLOW_PREFIX)
    )


def warn_unclaimed(
    known: MutableMapping[str, SubscriptionInfo], running: Collection[str], head: int
) -> None:
    """Log a warning for each subscription of the log that no handler claims.

    The bus calls it at the first await of the body of ``Bus.open``, so the
    subscriptions made before it count as claimed.
    """
    for name in unclaimed(known, running):
        cursor = known[name].cursor
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


async def apply_drop(
    log: _storage.Storage,
    write_lock: asyncio.Lock,
    known: MutableMapping[str, SubscriptionInfo],
    running: Collection[str],
    name: str | None,
) -> None:
    """Drop the subscription ``name`` from the log, as the command line queued it,
    unless a handler runs it (``running``). Logs what it did; never raises for a
    refusal."""
    if name is None:
        logger.error("ignoring a queued drop command that names no subscription")
        return
    if name in running:
        logger.warning(
            "refused a queued drop of subscription %r: a handler on this bus runs it",
            name,
            extra={"subscription": name},
        )
        return
    try:
        async with write_lock:
            existed = await log.drop_subscription(name)
    except _storage.StorageError as exc:
        raise translate_storage_error(exc) from exc
    known.pop(name, None)
    logger.warning(
        "applied a queued drop of subscription %r%s",
        name,
        "" if existed else ": it was not in the log",
        extra={"subscription": name},
    )
