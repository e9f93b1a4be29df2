"""Keyed handler state: buffered during a handler call, committed with its
acknowledgement, and readable from outside the handler."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TypeVar, overload

import msgspec

import storage as _storage

from ._errors import PayloadError, translate_storage_error

T = TypeVar("T")

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()


class StateCache:
    """Committed state of one subscription, cached (bounded) in front of the log.

    The bus is the only writer of a subscription's state, so a write-through cache
    stays coherent; a read that raced a commit is not cached.
    """

    def __init__(self, log: _storage.Storage, subscription: str, size: int = 10_000) -> None:
        self._log = log
        self.subscription = subscription
        self._size = size
        self._values: OrderedDict[str, bytes | None] = OrderedDict()
        self._generation = 0

    async def get_raw(self, key: str) -> bytes | None:
        values = self._values
        if key in values:
            values.move_to_end(key)
            return values[key]
        generation = self._generation
        try:
            found = await self._log.get_state(self.subscription, [key])
        except _storage.StorageError as exc:
            raise translate_storage_error(exc) from exc
        raw = found.get(key)
        if generation == self._generation:
            self._remember(key, raw)
        return raw

    def _remember(self, key: str, raw: bytes | None) -> None:
        self._values[key] = raw
        self._values.move_to_end(key)
        while len(self._values) > self._size:
            self._values.popitem(last=False)

    def committed(self, writes: list[tuple[str, str, bytes | None]]) -> None:
        """Apply writes that just committed."""
        self._generation += 1
        for _, key, raw in writes:
            self._remember(key, raw)


class State:
    """``ctx.state``: this subscription's keyed state, inside a handler call.

    Writes are buffered and committed in the same transaction as the handled event's
    acknowledgement: after a crash either both happened or neither did, so each
    change applies exactly once per event. Reads see this call's own writes first.
    Values are msgspec-encodable; they come back as built-in types.

    For exactly-once read-modify-write, key the state by the event key: events of one
    key are never handled concurrently within an (ordered) subscription.
    """

    __slots__ = ("_cache", "_overlay", "_writes")

    def __init__(self, cache: StateCache) -> None:
        self._cache = cache
        self._writes: list[tuple[str, str, bytes | None]] = []
        self._overlay: dict[str, bytes | None] = {}

    @overload
    async def get(self, key: str) -> object | None: ...

    @overload
    async def get(self, key: str, default: T) -> object | T: ...

    async def get(self, key: str, default: object = None) -> object:
        """The value under ``key`` (this call's writes included), or ``default``.

        Cancellation: a read; nothing changes.
        """
        raw = self._overlay[key] if key in self._overlay else await self._cache.get_raw(key)
        return default if raw is None else _DECODER.decode(raw)

    def set(self, key: str, value: object) -> None:
        """Set ``key``; committed with the acknowledgement.

        Raises:
            PayloadError: The value cannot be encoded.
        """
        if not isinstance(key, str):
            raise ValueError(f"state keys are strings, got {type(key).__name__}")
        try:
            raw = _ENCODER.encode(value)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            raise PayloadError(f"state:{self._cache.subscription}", str(exc)) from exc
        self._writes.append((self._cache.subscription, key, raw))
        self._overlay[key] = raw

    def delete(self, key: str) -> None:
        """Remove ``key``; committed with the acknowledgement."""
        self._writes.append((self._cache.subscription, key, None))
        self._overlay[key] = None

    # -- used by the dispatcher -----------------------------------------------------

    def _mark(self) -> int:
        return len(self._writes)

    def _rollback_to(self, mark: int) -> None:
        if mark < len(self._writes):
            del self._writes[mark:]
            self._overlay = {key: raw for _, key, raw in self._writes}

    def _take(self) -> list[tuple[str, str, bytes | None]]:
        writes, self._writes = self._writes, []
        self._overlay = {}
        return writes


class StateReader:
    """``bus.state(subscription)``: the committed state, read from outside handlers."""

    def __init__(self, log: _storage.Storage, cache: StateCache | None, subscription: str) -> None:
        self._log = log
        self._cache = cache
        self._subscription = subscription

    @overload
    async def get(self, key: str) -> object | None: ...

    @overload
    async def get(self, key: str, default: T) -> object | T: ...

    async def get(self, key: str, default: object = None) -> object:
        """The committed value under ``key``, or ``default``.

        Cancellation: a read; nothing changes.
        """
        if self._cache is not None:
            raw = await self._cache.get_raw(key)
        else:
            try:
                raw = (await self._log.get_state(self._subscription, [key])).get(key)
            except _storage.StorageError as exc:
                raise translate_storage_error(exc) from exc
        return default if raw is None else _DECODER.decode(raw)

    async def items(self) -> AsyncIterator[tuple[str, object]]:
        """Every committed key and value, in key order (paged from the log)."""
        after = ""
        while True:
            try:
                page = await self._log.state_items(self._subscription, after, 1000)
            except _storage.StorageError as exc:
                raise translate_storage_error(exc) from exc
            for key, raw in page:
                yield key, _DECODER.decode(raw)
            if len(page) < 1000:
                return
            after = page[-1][0]
