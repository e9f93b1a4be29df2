"""Keyed handler state: buffered during a handler call, committed with its
acknowledgement, and readable from outside the handler."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TypeVar, overload

import msgspec

import eventbus.storage as _storage

from .._errors import PayloadError, translate_storage_error
from ._buffer import CallBuffer
from ._ports import DispatchLog

T = TypeVar("T")

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()

Write = tuple[str, str, bytes | None]


class StateCache:
    """Committed state of one subscription, cached (bounded) in front of the log, with
    the writes of handled events whose acknowledgement has not committed yet.

    The bus is the only writer of a subscription's state, so a write-through cache
    stays coherent; a read that raced a commit is not cached. Writes are *staged*
    when their handler call succeeds (later calls of the same key must see them, as
    they commit in that order) and become *committed* when their acknowledgement
    does; readers from outside the handlers see committed values only.
    """

    def __init__(self, log: DispatchLog, subscription: str, size: int = 10_000) -> None:
        self._log = log
        self.subscription = subscription
        self._size = size
        self._values: OrderedDict[str, bytes | None] = OrderedDict()
        self._staged: dict[str, list[object]] = {}  # key -> [latest value, writes pending]
        self._generation = 0

    async def get_raw(self, key: str, *, staged: bool = True) -> bytes | None:
        """The value under ``key``: the latest staged write (if ``staged``), else the
        committed one."""
        if staged:
            pending = self._staged.get(key)
            if pending is not None:
                return pending[0]  # type: ignore[return-value]
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

    def stage(self, writes: list[Write]) -> None:
        """Writes of a handler call that succeeded: visible to later calls now."""
        staged = self._staged
        for _, key, raw in writes:
            pending = staged.get(key)
            if pending is None:
                staged[key] = [raw, 1]
            else:
                pending[0] = raw
                pending[1] += 1  # type: ignore[operator]

    def committed(self, writes: list[Write]) -> None:
        """Staged writes whose acknowledgement committed (in the order staged)."""
        self._generation += 1
        staged = self._staged
        for _, key, raw in writes:
            self._remember(key, raw)
            pending = staged.get(key)
            if pending is not None:
                pending[1] -= 1  # type: ignore[operator]
                if pending[1] == 0:
                    del staged[key]


class State:
    """``ctx.state``: this subscription's keyed state, inside a handler call.

    Writes are buffered and committed in the same transaction as the handled event's
    acknowledgement: after a crash either both happened or neither did, so each
    change applies exactly once per event. Reads see this call's own writes first,
    then those of earlier calls. Values are msgspec-encodable; they come back as
    built-in types.

    For exactly-once read-modify-write, key the state by the event key: events of one
    key are never handled concurrently within an (ordered) subscription.
    """

    __slots__ = ("_buffer", "_cache")

    def __init__(self, cache: StateCache, buffer: CallBuffer) -> None:
        self._cache = cache
        self._buffer = buffer

    @overload
    async def get(self, key: str) -> object | None: ...

    @overload
    async def get(self, key: str, default: T) -> object | T: ...

    async def get(self, key: str, default: object = None) -> object:
        """The value under ``key`` (this call's writes included), or ``default``.

        Cancellation: a read; nothing changes.
        """
        overlay = self._buffer.overlay
        raw = overlay[key] if key in overlay else await self._cache.get_raw(key)
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
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
            raise PayloadError(f"state:{self._cache.subscription}", str(exc)) from exc
        self._buffer.writes.append((self._cache.subscription, key, raw))
        self._buffer.overlay[key] = raw

    def delete(self, key: str) -> None:
        """Remove ``key``; committed with the acknowledgement."""
        self._buffer.writes.append((self._cache.subscription, key, None))
        self._buffer.overlay[key] = None


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
            raw = await self._cache.get_raw(key, staged=False)
        else:
            try:
                raw = (await self._log.get_state(self._subscription, [key])).get(key)
            except _storage.StorageError as exc:
                raise translate_storage_error(exc) from exc
        return default if raw is None else _DECODER.decode(raw)

    async def items(self) -> AsyncIterator[tuple[str, object]]:
        """Every committed key and value, in key order (paged from the log).

        Cancellation: a read; nothing changes.
        """
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
