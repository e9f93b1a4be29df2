"""Checking and encoding what a publish is given, before anything is queued.

Everything that could make a record fail inside the shared group commit is refused
here, with a typed error, so one caller's bad argument never reaches the transaction
that carries everyone else's events: topics, keys and idempotency keys must be
``str`` (valid Unicode, which SQLite needs), headers a ``dict`` of ``str`` to ``str``,
the payload msgspec-encodable and not nested too deeply (or cyclic).

The size limit is enforced without encoding more than the limit allows: a payload
whose size is not known up front is encoded into a buffer that cannot grow past the
limit, so a 2 GB payload (or a list holding one large string many times) costs a
few milliseconds and no memory beyond ``max_event_bytes`` before ``EventTooLarge``.
"""

from __future__ import annotations

from collections.abc import Iterable
from time import time as _time

import msgspec

from eventbus.storage import NewRecord

from .._errors import EventTooLarge, InvalidEvent, PayloadError
from .._event import FRESH_IDS, Message, more_event_ids, new_event_id

__all__ = ["EventEncoder"]

# Payload types whose encoded size is known without encoding them: at most 9 bytes
# (an int past 64 bits does not encode at all), and byte strings (their length and a
# header of at most 5).
_FIXED_SIZE = frozenset({int, float, bool, type(None)})
_BUFFERS = frozenset({bytes, bytearray, memoryview})
# msgpack headers are at most 9 bytes (a float64 or uint64, or a str32 / bin32 prefix).
_HEADER = 9
# The first bounded buffer; each retry is this many times larger. Most events fit
# the first (the throughput benchmark's are about 100 bytes).
_FIRST_BUFFER = 512
_GROWTH = 8
# Room past the limit, so that an encoder reserving a few bytes ahead of what it
# writes is never mistaken for an event over the limit.
_SLACK = 64
# The first bounded buffer is a copy of this one (never written or exported itself),
# and the encoded bytes are copied out with a join: each is about a third of the cost
# of the constructors bytearray(n) and bytes(buffer), which parse their arguments.
_FIRST = bytearray(_FIRST_BUFFER)
_copy_out = b"".join
# Topics the encoder remembers as valid (beyond, each is checked again).
_TOPICS_REMEMBERED = 1024


def _bounded_encoding_works() -> bool:
    """Whether msgspec grows an ``encode_into`` buffer through the normal resize, which
    a live memoryview forbids, and shrinks it without one: what the bounded encoding
    relies on. Checked once; if not, payloads are encoded in full and then measured."""
    encoder = msgspec.msgpack.Encoder()
    small, large = bytearray(16), bytearray(16)
    try:
        with memoryview(small):
            encoder.encode_into(1, small)
    except BufferError:
        return False
    try:
        with memoryview(large):
            encoder.encode_into("x" * 64, large)
    except BufferError:
        return bytes(small) == encoder.encode(1)
    return False


_BOUNDED = _bounded_encoding_works()


class EventEncoder:
    """Turns publish arguments into a :class:`eventbus.storage.NewRecord`, or raises.

    One per bus: it reuses one msgspec encoder. Not thread-safe (the bus calls it on
    the event loop only).

    Args:
        max_event_bytes: The limit on payload, headers, topic, key and idempotency
            key together, in encoded bytes.
    """

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._encoder = msgspec.msgpack.Encoder()
        # Topics found valid for the fast path (ASCII, not empty, not "*"), so that
        # the common case checks one membership; bounded, since topics may be made up.
        self._topics: set[str] = set()

    def encode(
        self,
        topic: str,
        payload: object,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        now: float | None = None,
    ) -> NewRecord:
        """Check and encode one event.

        Raises:
            InvalidEvent: The topic is not a non-empty ``str`` other than ``"*"``, or
                the key or idempotency key is not a ``str`` or None, or one of them is
                not valid Unicode.
            PayloadError: The payload or headers cannot be encoded (wrong type, too
                deeply nested, cyclic).
            EventTooLarge: The event would encode to more than ``max_event_bytes``.
        """
        limit = self.max_event_bytes
        if (
            headers is None
            and idempotency_key is None
            and type(payload) is dict
            and type(topic) is str
            and (topic in self._topics or self._fast_topic(topic))
            and (key is None or (type(key) is str and key.isascii()))
        ):
            # The common case in one go: ASCII topic and key, a dict payload.
            budget = limit - len(topic) - (0 if key is None else len(key))
            if budget > _FIRST_BUFFER:
                # Most events fit the first bounded buffer (see _encode_bounded).
                buffer = _FIRST.copy()
                view = memoryview(buffer)
                try:
                    self._encoder.encode_into(payload, buffer)
                except Exception:  # noqa: BLE001 - too large or not encodable: see below
                    view.release()
                    data = self._encode_bounded(topic, payload, budget, _FIRST_BUFFER * _GROWTH)
                else:
                    view.release()
                    data = _copy_out((buffer,))
            else:
                data = self._encode_bounded(topic, payload, budget) if budget > 0 else None
            if data is None:
                raise self._too_large(topic)
            try:
                event_id = FRESH_IDS.pop()
            except IndexError:
                event_id = more_event_ids()
            return NewRecord(
                event_id, topic, key, data, None, _time() if now is None else now, None
            )
        # The common case first: ASCII str topic and keys, measured without encoding.
        if type(topic) is str and topic.isascii() and topic and topic != "*":
            size = len(topic)
        else:
            size = _text_size("topic", topic, topic, limit)
            if not topic or topic == "*":
                raise InvalidEvent("topic", topic, "a non-empty str other than '*'")
        if key is not None:
            if type(key) is str and key.isascii():
                size += len(key)
            else:
                size += _text_size("key", key, topic, limit)
        if idempotency_key is not None:
            if type(idempotency_key) is str and idempotency_key.isascii():
                size += len(idempotency_key)
            else:
                size += _text_size("idempotency_key", idempotency_key, topic, limit)
        if size > limit:
            raise EventTooLarge(topic, size, limit)
        raw_headers = None
        if headers is not None:
            raw_headers = self._headers(topic, headers, limit - size)
            if raw_headers is not None:
                size += len(raw_headers)
        data = self._payload(topic, payload, limit - size)
        if data is None:
            raise self._too_large(topic)
        size += len(data)
        if size > limit:
            raise EventTooLarge(topic, size, limit)
        return NewRecord(
            new_event_id(),
            topic,
            key,
            data,
            raw_headers,
            _time() if now is None else now,
            idempotency_key,
        )

    def encode_many(self, messages: Iterable[Message]) -> list[NewRecord]:
        """Check and encode the messages of one ``publish_many``: all, or an error.

        Raises:
            InvalidEvent: An item is not a :class:`Message`, or as for :meth:`encode`.
            PayloadError, EventTooLarge: As for :meth:`encode`.
        """
        encode = self.encode
        records: list[NewRecord] = []
        append = records.append
        now = _time()  # published together: one creation time
        for message in messages:
            if type(message) is not Message and not isinstance(message, Message):
                raise InvalidEvent("each item of publish_many", message, "a Message")
            append(
                encode(
                    message.topic,
                    message.payload,
                    message.key,
                    message.headers,
                    message.idempotency_key,
                    now,
                )
            )
        return records

    def _headers(self, topic: str, headers: object, budget: int) -> bytes | None:
        if not isinstance(headers, dict):
            raise PayloadError(
                topic, f"headers must be a dict of str to str, got {type(headers).__name__}"
            )
        if not headers:
            return None
        total = 0  # a lower bound on the encoded size: one byte per character
        for name, value in headers.items():
            if not (isinstance(name, str) and isinstance(value, str)):
                raise PayloadError(topic, "headers must map str to str")
            total += len(name) + len(value) + 2
            if total > budget:
                raise self._too_large(topic)
        try:
            return self._encoder.encode(headers)
        except UnicodeEncodeError as exc:
            raise PayloadError(topic, f"headers are not valid Unicode: {exc}") from exc

    def _too_large(self, topic: str) -> EventTooLarge:
        """The error for an event found over the limit before it was fully encoded."""
        limit = self.max_event_bytes
        return EventTooLarge(topic, limit + 1, limit, at_least=True)

    def _payload(self, topic: str, payload: object, budget: int) -> bytes | None:
        """The encoded payload, or None when it would take more than ``budget`` bytes.

        Exact types are dispatched on ``type()`` (three isinstance calls against
        tuples cost more than the encoding of a small event)."""
        kind = type(payload)
        if kind is dict and _BOUNDED:  # the most common payload first
            return self._encode_bounded(topic, payload, budget)
        if kind in _FIXED_SIZE:
            return self._encode(topic, payload)
        if kind is str:
            length = len(payload)  # type: ignore[arg-type]
            if length > budget:
                return None  # at least one byte per character
            if 4 * length + _HEADER <= budget:
                return self._encode(topic, payload)
        elif kind in _BUFFERS:
            length = payload.nbytes if isinstance(payload, memoryview) else len(payload)  # type: ignore[arg-type]
            return None if length > budget else self._encode(topic, payload)
        if not _BOUNDED:
            return self._encode(topic, payload)
        return self._encode_bounded(topic, payload, budget)

    def _fast_topic(self, topic: str) -> bool:
        """Whether the common case's encoding may take ``topic`` (remembered if so)."""
        if not (_BOUNDED and topic.isascii() and topic and topic != "*"):
            return False
        if len(self._topics) < _TOPICS_REMEMBERED:
            self._topics.add(topic)
        return True

    def _encode(self, topic: str, payload: object) -> bytes:
        try:
            return self._encoder.encode(payload)
        except RecursionError as exc:
            raise PayloadError(topic, "the payload is nested too deeply, or cyclic") from exc
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            raise PayloadError(topic, str(exc)) from exc

    def _encode_bounded(
        self, topic: str, payload: object, budget: int, first: int = _FIRST_BUFFER
    ) -> bytes | None:
        """Encode into buffers that a live memoryview keeps from growing: msgspec's
        resize fails with ``BufferError`` as soon as the encoding outgrows one. A
        small buffer first (most events fit), then larger ones up to the budget;
        ``first`` is the size to start from. (:meth:`encode` tries the first buffer of
        its common case inline.)"""
        size = first if budget > first else budget
        while True:
            last = size >= budget
            buffer = bytearray(budget + _SLACK if last else size)
            view = memoryview(buffer)
            try:
                self._encoder.encode_into(payload, buffer)
            except BufferError:
                if last:
                    return None
                size *= _GROWTH
                continue
            except RecursionError as exc:
                raise PayloadError(topic, "the payload is nested too deeply, or cyclic") from exc
            except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
                raise PayloadError(topic, str(exc)) from exc
            finally:
                view.release()
            return _copy_out((buffer,)) if len(buffer) <= budget else None


def _text_size(field: str, value: object, topic: object, limit: int) -> int:
    """The UTF-8 size of a topic, key or idempotency key, which must be a ``str``
    that SQLite can store (no lone surrogates)."""
    if not isinstance(value, str):
        raise InvalidEvent(field, value, "a str" if field == "topic" else "a str or None")
    if value.isascii():
        size = len(value)
    elif len(value) > limit:
        size = len(value)  # over the limit whatever its encoding; not worth encoding
    else:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise InvalidEvent(field, value, "valid Unicode (no lone surrogates)") from None
    if size > limit:
        raise EventTooLarge(
            topic if isinstance(topic, str) else "?", size, limit, at_least=not value.isascii()
        )
    return size
