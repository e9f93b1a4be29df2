"""Every exception the bus raises on purpose.

::

    BusError
    ├── BusClosed                the bus is closed (or closing): open a new one
    ├── BusFull                  publish_nowait found max_pending_publishes waiting
    ├── EventTooLarge            the event exceeds max_event_bytes; nothing written
    ├── PayloadError             the payload or headers cannot be encoded; nothing written
    ├── PayloadValidationError   a payload does not decode as its handler's Event[T]
                                 (dead-lettered at once, never retried)
    ├── InvalidEvent             a topic, key or idempotency key is not allowed
    ├── ConfigError              a configuration key or value is wrong (names the key)
    ├── SubscriptionError        a subscribe() call is wrong (bad topic, handler, name)
    ├── DrainTimeout             drain() ran out of time; says which subscriptions lag
    ├── HandlerStuck             reconciliation cancelled a handler call that ran too long
    ├── HookError                a hook cannot be registered (it has no hook method)
    │   └── HookFailed           a before_publish hook raised; nothing was published
    └── StorageError             the log failed (also a storage.StorageError)
        ├── LogLocked            another process owns the log file (names its pid)
        ├── LogBusy              another connection held the write lock past busy_timeout
        ├── LogDirectoryMissing  the log's directory does not exist
        ├── UnsupportedPlatform  a log file needs a POSIX system
        ├── NotALog              the file is not an event log
        ├── CorruptLog           SQLite reports the file as damaged
        ├── SchemaTooNew         written by a newer eventbus
        └── StorageFull          the disk is full; the write was rolled back

Storage errors are raised by the ``storage`` package (which imports nothing from
here) and translated once, at the bus's boundary, by :func:`translate_storage_error`.
"""

from __future__ import annotations

import reprlib

import eventbus.storage as _storage


class BusError(Exception):
    """Root of every exception the bus raises on purpose."""


class BusClosed(BusError):
    """The bus is closed or closing; nothing was published. Open a new bus."""

    def __init__(self, what: str = "the bus is closed") -> None:
        super().__init__(f"{what}; open a new bus with Bus.open(...) to continue")


class BusFull(BusError):
    """``publish_nowait`` found the writer queue full: the event was not enqueued."""

    def __init__(self, pending: int) -> None:
        self.pending = pending
        super().__init__(
            f"{pending} publishes are already waiting for the log writer "
            "(BusConfig.max_pending_publishes); await publish() to wait for room, "
            "or retry later"
        )


class WrongEventLoop(BusError, RuntimeError):
    """A publish came from another thread or event loop than the bus's own; nothing
    was published. A bus belongs to the event loop that opened it."""

    def __init__(self, method: str) -> None:
        super().__init__(
            f"Bus.{method} was called outside the event loop that opened the bus "
            "(another thread, or another loop); nothing was published. Publish from "
            "the bus's own loop; from another thread, hand the call to that loop: "
            "asyncio.run_coroutine_threadsafe(bus.publish(...), bus_loop).result()"
        )


class EventTooLarge(BusError):
    """The encoded event is larger than ``BusConfig.max_event_bytes``."""

    def __init__(self, topic: str, size: int, limit: int, *, at_least: bool = False) -> None:
        self.topic = topic
        self.size = size  # a lower bound when at_least: encoding stopped there
        self.limit = limit
        self.at_least = at_least
        more = "at least " if at_least else ""
        super().__init__(
            f"event on topic {reprlib.repr(topic)} encodes to {more}{size} bytes, over the "
            f"limit of {limit} (BusConfig.max_event_bytes); nothing was written. Store large "
            "blobs elsewhere and publish a reference, or raise the limit"
        )


class PayloadError(BusError, TypeError):
    """The payload (or headers) cannot be encoded with msgspec; nothing was written."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(
            f"cannot encode the event for topic {reprlib.repr(topic)}: {reason}; payloads must be "
            "msgspec-encodable (dicts, lists, str, int, float, bool, None, bytes, "
            "msgspec.Struct, dataclasses...)"
        )


class PayloadValidationError(BusError):
    """An event's payload does not decode as the type its handler is annotated with
    (``Event[T]`` or ``list[Event[T]]``), or its stored bytes do not decode at all.

    Raised inside the subscription, never to a publisher: it is the failure recorded
    for the event's first attempt, and the event is dead-lettered at once, without
    retries, since the same payload never decodes (``drain(raise_failures=True)``
    surfaces it in tests). Redriving the dead letter fails the same way unless the
    handler's type changed meanwhile: publish a corrected event instead, or change
    the type (a new field with a default, a wider type) and then redrive.

    Attributes:
        subscription: The subscription that could not take the event.
        event_id: The event's id.
        seq: Its position in the log.
        topic: Its topic.
        expected: The name of the type it should decode as ("" when its stored
            bytes are not valid msgpack).
        reason: msgspec's explanation (which field, what was expected).
        path: Where in the payload it failed, as msgspec writes it: ``"$"`` for
            the payload itself, ``"$.amount"``, ``"$.items[2].sku"``.
    """

    def __init__(
        self,
        subscription: str,
        event_id: str,
        seq: int,
        topic: str,
        expected: str,
        reason: str,
    ) -> None:
        self.subscription = subscription
        self.event_id = event_id
        self.seq = seq
        self.topic = topic
        self.expected = expected
        self.reason = reason
        at = reason.rfind(" - at `$")
        self.path = reason[at + 7 : -1] if at >= 0 and reason.endswith("`") else "$"
        what = f"does not decode as {expected}" if expected else "is not valid msgpack"
        super().__init__(
            f"subscription {subscription!r}: the payload of event {event_id} (seq {seq}, "
            f"topic {reprlib.repr(topic)}) {what}: {reason}. It was dead-lettered without "
            "retries, since the same payload never decodes: publish a corrected event, or "
            "change the handler's payload type to accept it and then redrive the dead letter"
        )


class InvalidEvent(BusError, ValueError):
    """A topic, key or idempotency key given to a publish is not allowed (wrong type,
    empty topic, ``"*"``, text that is not valid Unicode); nothing was written."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value_type = type(value).__name__
        self.expected = expected
        super().__init__(
            f"{field} must be {expected}, got {self.value_type} {reprlib.repr(value)}; nothing was "
            "written. Fix the argument and publish again"
        )


class ConfigError(BusError, ValueError):
    """A configuration key is unknown or its value impossible."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"configuration {key!r}: {problem}")


class SubscriptionError(BusError):
    """A ``subscribe`` call cannot be honoured (bad handler, duplicate name)."""


class DrainTimeout(BusError, TimeoutError):
    """``drain`` timed out before every subscription caught up (and, with
    ``workflows=True``, before every workflow run executing here finished).

    Attributes:
        timeout: The seconds it waited.
        lagging: Each subscription still behind, with the position it has finished up to.
        pending: What each of those still holds, in words.
        workflows: The ids of the workflow runs still executing here, when
            ``drain(workflows=True)`` waited for them.
    """

    def __init__(
        self,
        timeout: float,
        lagging: dict[str, int],
        pending: dict[str, str] | None = None,
        workflows: list[str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.lagging = lagging
        self.pending = pending or {}
        self.workflows = workflows or []
        parts = []
        if lagging or not self.workflows:
            behind = "; ".join(
                f"{name} {self.pending[name]}" if name in self.pending else f"{name} at {pos}"
                for name, pos in sorted(lagging.items())
            )
            parts.append(f"subscriptions still behind: {behind or 'none'}")
        if self.workflows:
            shown = ", ".join(repr(run) for run in self.workflows[:5])
            more = f" and {len(self.workflows) - 5} more" if len(self.workflows) > 5 else ""
            parts.append(f"workflow runs still executing: {shown}{more}")
        super().__init__(
            f"drain timed out after {timeout}s; {'; '.join(parts)}. "
            "Check bus.metrics(), the dead letters or the runs' status"
        )


class HandlerStuck(BusError):
    """A handler call ran longer than ``BusConfig.reconcile_lease``; reconciliation
    cancelled it. Raised inside the subscription, never to the caller: it is the
    failure recorded for that attempt, which is retried (or dead-lettered after
    ``max_attempts``) like any other."""

    def __init__(self, subscription: str, lease: float, seqs: tuple[int, ...] = ()) -> None:
        self.subscription = subscription
        self.lease = lease
        self.seqs = seqs
        super().__init__(
            f"handler of subscription {subscription!r} ran longer than the reconcile lease "
            f"({lease:g}s); cancelled and retried. Give the handler a RetryPolicy.timeout "
            "shorter than the lease, or raise BusConfig.reconcile_lease if it is legitimately "
            "that slow"
        )


class HookError(BusError):
    """A hook given to ``bus.hooks`` (or ``Bus.open(hooks=...)``) cannot be used."""


class HookFailed(HookError):
    """A ``before_publish`` hook raised, so the publish did not happen: nothing was
    written (or, for ``publish_many``, none of the messages). The hook's own
    exception is the ``__cause__``.

    Attributes:
        hook: The hook's name (its ``__qualname__``, or its type's).
        topic: The topic of the event being published.
    """

    def __init__(self, hook: str, topic: str, error: BaseException) -> None:
        self.hook = hook
        self.topic = topic
        super().__init__(
            f"before_publish hook {hook} failed for an event on topic {reprlib.repr(topic)} "
            f"({type(error).__name__}: {error}); nothing was published. Fix the hook or "
            "remove it with bus.hooks.remove(...)"
        )


class StorageError(BusError, _storage.StorageError):
    """The log failed; nothing partial was written."""


class LogLocked(StorageError, _storage.LogLocked):
    """Another process owns the log file."""


class LogBusy(StorageError, _storage.LogBusy):
    """Another connection held the log's write lock past ``busy_timeout``; retryable."""


class LogDirectoryMissing(StorageError, _storage.LogDirectoryMissing):
    """The directory that should hold the log does not exist."""


class UnsupportedPlatform(StorageError, _storage.UnsupportedPlatform):
    """A log file needs a POSIX system (Linux, macOS, BSD)."""


class NotALog(StorageError, _storage.NotALog):
    """The file is not an event log."""


class CorruptLog(StorageError, _storage.CorruptLog):
    """SQLite reports the file as damaged."""


class SchemaTooNew(StorageError, _storage.SchemaTooNew):
    """The log was written by a newer eventbus."""


class StorageFull(StorageError, _storage.StorageFull):
    """The disk is full; the write was rolled back."""


_TRANSLATION: tuple[tuple[type[_storage.StorageError], type[StorageError]], ...] = (
    (_storage.LogLocked, LogLocked),
    (_storage.LogBusy, LogBusy),
    (_storage.LogDirectoryMissing, LogDirectoryMissing),
    (_storage.UnsupportedPlatform, UnsupportedPlatform),
    (_storage.NotALog, NotALog),
    (_storage.CorruptLog, CorruptLog),
    (_storage.SchemaTooNew, SchemaTooNew),
    (_storage.StorageFull, StorageFull),
    (_storage.StorageClosed, StorageError),
    (_storage.StorageError, StorageError),
)


def translate_storage_error(exc: _storage.StorageError) -> StorageError:
    """Return the bus's twin of a storage error, keeping its attributes and message."""
    if isinstance(exc, StorageError):
        return exc
    for source, target in _TRANSLATION:
        if isinstance(exc, source):
            twin = target.__new__(target)
            twin.__dict__.update(exc.__dict__)
            twin.args = exc.args
            return twin
    raise AssertionError("unreachable: every storage error has a twin")  # pragma: no cover
