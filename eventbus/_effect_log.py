"""The log of outside effects' results, recorded under their idempotency keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import eventbus.storage as _storage
from eventbus.storage import WriteBatch

from ._errors import translate_storage_error


class EffectLog:
    """The results of outside effects, recorded in the log under their idempotency
    keys (``bus.effects``; :func:`idempotent` reads and writes it)."""

    def __init__(
        self, log: _storage.Storage, commit: Callable[[WriteBatch], Awaitable[object]]
    ) -> None:
        self._log = log
        self._commit = commit

    async def get(self, key: str) -> bytes | None:
        """The recorded (encoded) result under ``key``, or None.

        Cancellation: a read; nothing changes.
        """
        try:
            return await self._log.get_effect(key)
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc

    async def record(self, key: str, result: bytes) -> None:
        """Record the (encoded) result under ``key``; the first record of a key wins.

        Cancellation: the record may still commit.
        """
        await self._commit(WriteBatch(effects=[(key, result)]))
