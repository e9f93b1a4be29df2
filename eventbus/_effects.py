"""``eventbus.idempotent``: record an outside effect's result under its idempotency
key in the log file, and return the recorded result when it is asked for again."""

from __future__ import annotations

import asyncio
import functools
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

import msgspec

from ._errors import PayloadError

if TYPE_CHECKING:
    from ._bus import Bus

P = ParamSpec("P")
R = TypeVar("R")

_ENCODER = msgspec.msgpack.Encoder()


class _Decorator(Protocol):
    def __call__(self, fn: Callable[P, Awaitable[R]], /) -> Callable[P, Awaitable[R]]: ...


def idempotent(bus: Bus, *, result_type: type | None = None) -> _Decorator:
    """Make an outside effect idempotent by its ``idempotency_key`` keyword argument.

    The first call with a key runs the function and records its (msgspec-encodable)
    result in the log; later calls with that key, in this process or after a restart,
    return the recorded result without running it. Pass ``ctx.idempotency_key`` from
    a handler, so a redelivered event does not repeat the effect::

        @eventbus.idempotent(bus)
        async def charge(order: str, amount: int, *, idempotency_key: str) -> str:
            return await payments.charge(order, amount, idempotency_key=idempotency_key)

    Concurrent calls with one key in this process run the function once. A crash
    between the function's return and the record leaves the effect unrecorded: the
    next call runs it again, so the outside call should itself accept the key (as
    payment APIs do). The function receives ``idempotency_key`` too.

    Args:
        bus: The bus whose log keeps the records (for ``idempotency_retention``).
        result_type: Decode recorded results into this type (else built-in types).
    """
    decoder = msgspec.msgpack.Decoder(result_type) if result_type else msgspec.msgpack.Decoder()
    locks: dict[str, asyncio.Lock] = {}

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            key = kwargs.get("idempotency_key")
            if not isinstance(key, str) or not key:
                raise ValueError(
                    f"{fn.__qualname__} is idempotent: call it with idempotency_key=<str>"
                )
            lock = locks.setdefault(key, asyncio.Lock())
            try:
                async with lock:
                    recorded = await bus.effects.get(key)
                    if recorded is not None:
                        return typing.cast(R, decoder.decode(recorded))
                    result: R = await fn(*args, **kwargs)
                    try:
                        raw = _ENCODER.encode(result)
                    except (TypeError, ValueError, msgspec.EncodeError) as exc:
                        raise PayloadError(f"effect:{key}", str(exc)) from exc
                    await bus.effects.record(key, raw)
                    return result
            finally:
                if not lock.locked() and locks.get(key) is lock:
                    del locks[key]

        return wrapper

    return decorate
