"""When a group commit fails because of one record: commit its parts apart, so only
the part holding that record fails.

Publishes are checked before they are queued (``_encoding``), so this is the safety
net for whatever still gets past: a record the storage refuses fails its own
publisher, never the forty others that shared its transaction, the events queued
with ``publish_nowait`` beside it, or the acknowledgements riding in the same commit.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import eventbus.storage as _storage

from .._errors import BusClosed, BusError, StorageError, translate_storage_error

logger = logging.getLogger("eventbus.publish")

U = TypeVar("U")

# What a storage commit raises for a write it could not make: its own errors, and the
# errors Python raises for a value a driver cannot take (an unhashable key, a string
# with lone surrogates, an int past 64 bits). Anything else is a bug and propagates.
COMMIT_ERRORS = (_storage.StorageError, TypeError, ValueError, OverflowError)


def rejects_a_record(exc: BaseException) -> bool:
    """Whether a failed commit may be the fault of one of its records rather than of
    the log: the storage says so (``RecordRejected``), or it raised a Python value
    error instead of a storage error. A full disk, a damaged or busy file fail every
    part alike, so splitting the commit would only repeat them.
    """
    if isinstance(exc, _storage.StorageError):
        return isinstance(exc, _storage.RecordRejected)
    return isinstance(exc, COMMIT_ERRORS)


def commit_error(exc: BaseException) -> BaseException:
    """The error to give the publishers of a failed commit: the bus's twin of a
    storage error, and a ``StorageError`` around anything else the storage raised."""
    if isinstance(exc, _storage.StorageError):
        return translate_storage_error(exc)
    if isinstance(exc, BusError):
        return exc
    error = StorageError(f"the log could not store this write ({exc!r}); nothing was written")
    error.__cause__ = exc
    return error


async def commit_apart(
    units: Sequence[U],
    commit: Callable[[list[U]], Awaitable[None]],
    fail: Callable[[list[U], BaseException], None],
) -> None:
    """Commit the units of a failed group commit (each publish, ``publish_many`` or
    acknowledgement it held) in halves, halving again whichever half fails with
    :func:`rejects_a_record`, until the failing unit is alone and fails alone.

    Parts commit in their original order, so sequence numbers still follow publish
    order. One bad record among ``n`` units costs about ``2 log2 n`` transactions.

    Args:
        units: What the failed commit held, in order.
        commit: Commit these units in one transaction (resolving their futures), or
            raise.
        fail: Fail these units with this error.

    Cancellation: the part being committed, and every part not yet committed, fail
    with ``BusClosed``; parts already committed stay committed.
    """
    logger.warning(
        "a group commit of %d publishes and acknowledgements was refused over one record; "
        "committing them in parts so that only its own publisher fails",
        len(units),
    )
    todo: deque[list[U]] = deque(_halves(list(units)))
    while todo:
        part = todo.popleft()
        try:
            await commit(part)
        except COMMIT_ERRORS as exc:
            if len(part) > 1 and rejects_a_record(exc):
                todo.extendleft(reversed(_halves(part)))
            else:
                fail(part, exc)
        except BaseException:
            closed = BusClosed("the bus closed during this write's commit")
            for rest in (part, *todo):
                fail(rest, closed)
            raise


def _halves(units: list[U]) -> list[list[U]]:
    half = len(units) // 2
    return [units[:half], units[half:]]
