"""Configuration: :class:`BusConfig`, :class:`BatchPolicy`, :class:`RetryPolicy`,
:class:`BreakerPolicy`.

All are msgspec Structs, validated on construction (types and values), loadable from
TOML and ``EVENTBUS_*`` environment variables, or both (:meth:`BusConfig.load`: the
environment overrides the file, key by key). Unknown keys, values of the wrong type
and impossible values raise :class:`~eventbus.ConfigError` naming the key.

How a subscription's policies combine with the bus's: ``subscribe(retry=...)`` takes
a complete policy (``RetryPolicy(max_attempts=3)``: the fields it does not set take
the class defaults, not the bus's), or a dict of the fields to change in the bus's
policy (``{"max_attempts": 3}``: the others keep ``config.retry``'s values, from the
file or the environment); see :func:`merge_policy`.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from typing import Literal, TypeVar

import msgspec

from ._errors import ConfigError

T = TypeVar("T")

BatchMode = Literal["adaptive", "natural", "aimd", "fixed"]
Jitter = Literal["full", "equal", "decorrelated", "none"]


def _check_types(struct: msgspec.Struct, prefix: str) -> None:
    """Reject a field whose value does not have the field's declared type.

    msgspec checks types when it decodes or converts, not when a Struct is built
    directly, so ``BusConfig(durability="fast")`` would otherwise pass and fail much
    later. ``True`` is not accepted for a number, nor a dict for a policy; an ``int``
    is accepted for a ``float``.
    """
    for field in msgspec.structs.fields(type(struct)):
        value = getattr(struct, field.name)
        try:
            converted = msgspec.convert(value, field.type, strict=True)
        except msgspec.ValidationError:
            converted = _INVALID
        # convert() also builds a Struct from a dict and a tuple from a list, but the
        # Struct keeps what it was given: only the value itself passes (or an int for
        # a float). A tuple's items are checked by the Struct, which names the bad one.
        # A Literal's choice comes back as the Literal's own string, not the one given
        # (read from a file or argv): an equal string is the value itself.
        if not (
            converted is value
            or (isinstance(value, str) and converted == value)
            or (isinstance(value, int) and isinstance(converted, float))
            or (isinstance(value, tuple) and typing.get_origin(field.type) is tuple)
        ):
            raise ConfigError(
                prefix + field.name,
                f"expected {_describe(field.type)}, got {type(value).__name__} {value!r}",
            )


_INVALID = object()


def _describe(annotation: object) -> str:
    """``Literal['a', 'b']`` as "one of 'a', 'b'"; other types by their short names."""
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", getattr(annotation, "__name__", str(annotation)))


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, f"must be a finite number {bound}, got {value!r}")


class BatchPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a subscription groups events into handler calls.

    Attributes:
        mode: ``"adaptive"`` (default: latency feedback keeps batches small under
            light load and grows them under heavy load), ``"natural"`` (whatever is
            ready, up to ``max_size``), ``"aimd"`` (additive increase, multiplicative
            decrease) or ``"fixed"`` (wait up to ``max_wait`` to fill ``max_size``).
        min_size: Smallest batch the controller may aim for.
        max_size: Largest batch handed to one handler call.
        target_latency: Seconds a batch (wait plus handling) should take at most.
        max_wait: Seconds ``"fixed"`` waits for a batch to fill.
    """

    mode: BatchMode = "adaptive"
    min_size: int = 1
    max_size: int = 512
    target_latency: float = 0.05
    max_wait: float = 0.005

    def __post_init__(self) -> None:
        _check_types(self, "batch.")
        if self.min_size < 1:
            raise ConfigError("batch.min_size", f"must be at least 1, got {self.min_size}")
        if self.max_size < self.min_size:
            raise ConfigError(
                "batch.max_size",
                f"must not be below min_size ({self.min_size}), got {self.max_size}",
            )
        _positive("batch.target_latency", self.target_latency)
        _positive("batch.max_wait", self.max_wait, allow_zero=True)


class RetryPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How often, and how far apart, a failing event is tried again.

    The delay before attempt ``n + 1`` is ``initial_delay * multiplier ** (n - 1)``,
    capped at ``max_delay`` and then jittered (``"full"``: uniform in [0, delay]).

    Attributes:
        max_attempts: Attempts in all, the first included; then the event is
            dead-lettered.
        initial_delay: Seconds before the second attempt.
        max_delay: Cap on any delay.
        multiplier: Growth of the delay per attempt.
        jitter: ``"full"``, ``"equal"``, ``"decorrelated"`` or ``"none"``.
        timeout: Seconds one attempt may take before it is cancelled and counted as
            failed; None for no limit.
        retry_on: If given, only these exception types are retried; any other
            error dead-letters the event at once.
        give_up_on: Exception types that dead-letter the event at once.
        concurrency: Retries of one subscription that may run at the same time (on
            their own lane, beside fresh events).
        budget_ratio: Retries allowed per fresh event handled: a storm of failures
            cannot take over the process.
        budget_floor: Retries per second always allowed, whatever the fresh traffic.
    """

    max_attempts: int = 5
    initial_delay: float = 0.1
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: Jitter = "full"
    timeout: float | None = None
    retry_on: tuple[type[BaseException], ...] = ()
    give_up_on: tuple[type[BaseException], ...] = ()
    concurrency: int = 4
    budget_ratio: float = 0.2
    budget_floor: float = 10.0

    def __post_init__(self) -> None:
        _check_types(self, "retry.")
        if self.max_attempts < 1:
            raise ConfigError("retry.max_attempts", f"must be at least 1, got {self.max_attempts}")
        _positive("retry.initial_delay", self.initial_delay, allow_zero=True)
        _positive("retry.max_delay", self.max_delay, allow_zero=True)
        if self.max_delay < self.initial_delay:
            raise ConfigError(
                "retry.max_delay",
                f"must not be below initial_delay ({self.initial_delay}), got {self.max_delay}",
            )
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ConfigError("retry.multiplier", f"must be >= 1, got {self.multiplier!r}")
        if self.timeout is not None:
            _positive("retry.timeout", self.timeout)
        if self.concurrency < 1:
            raise ConfigError("retry.concurrency", f"must be at least 1, got {self.concurrency}")
        _positive("retry.budget_ratio", self.budget_ratio, allow_zero=True)
        _positive("retry.budget_floor", self.budget_floor, allow_zero=True)
        if self.budget_floor <= 0:
            raise ConfigError(
                "retry.budget_floor",
                f"must be > 0, or retries can wait forever for fresh traffic; got "
                f"{self.budget_floor}",
            )
        for key in ("retry_on", "give_up_on"):
            for kind in getattr(self, key):
                if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                    raise ConfigError(f"retry.{key}", f"{kind!r} is not an exception type")

    def retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` may be retried (before counting attempts)."""
        if self.give_up_on and isinstance(exc, self.give_up_on):
            return False
        return not self.retry_on or isinstance(exc, self.retry_on)


class BreakerPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When a subscription stops taking new events because they keep failing.

    The ratio counts first attempts (and probes): retries of an event that keeps
    failing do not count.

    Attributes:
        failure_ratio: Failures / calls over ``window`` that open the breaker.
        min_calls: Calls in the window before the ratio counts.
        window: Seconds of outcomes considered.
        cooldown: Seconds the breaker stays open before one probe.
        max_cooldown: Cap on the cool-down, which doubles after each failed probe.
    """

    failure_ratio: float = 0.5
    min_calls: int = 20
    window: float = 30.0
    cooldown: float = 5.0
    max_cooldown: float = 60.0

    def __post_init__(self) -> None:
        _check_types(self, "breaker.")
        if not 0 < self.failure_ratio <= 1:
            raise ConfigError(
                "breaker.failure_ratio", f"must be in (0, 1], got {self.failure_ratio!r}"
            )
        if self.min_calls < 1:
            raise ConfigError("breaker.min_calls", f"must be at least 1, got {self.min_calls}")
        for key in ("window", "cooldown", "max_cooldown"):
            _positive(f"breaker.{key}", getattr(self, key))
        if self.max_cooldown < self.cooldown:
            raise ConfigError(
                "breaker.max_cooldown",
                f"must not be below cooldown ({self.cooldown}), got {self.max_cooldown}",
            )


class BusConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of one bus. Every field has a default that suits a single service.

    Attributes:
        durability: ``"normal"`` (a returned publish survives a killed process),
            ``"full"`` (fsync per group commit: survives power loss) or ``"off"``.
        max_pending_publishes: Publishes that may wait for the log writer; beyond it
            ``publish`` waits and ``publish_nowait`` raises ``BusFull``.
        max_event_bytes: Largest encoded event (payload, headers, topic, key).
        channel_capacity: Events buffered in memory per subscription; a subscription
            further behind reads its backlog from the log.
        max_commit_batch: Most events appended in one group commit.
        retention: Seconds a finished event stays in the log before compaction.
        compact_interval: Seconds between compaction passes.
        idempotency_retention: Seconds an idempotency key is remembered.
        busy_timeout: Seconds a write waits, in all, for a lock another connection
            holds (a backup, an operator's ``sqlite3`` shell) before it fails with
            ``LogBusy``, which is retryable.
        open_timeout: Seconds opening keeps retrying a busy (recovering) file.
        close_timeout: Seconds ``close`` lets in-flight handlers finish before
            abandoning their batch (it is redelivered on the next open).
        batch: Default :class:`BatchPolicy` for subscriptions.
        retry: Default :class:`RetryPolicy` for subscriptions.
        breaker: Default :class:`BreakerPolicy` for subscriptions (None: no breaker).
        redrive_rate: Dead letters per second that ``redrive`` re-injects, at most.
        control_interval: Seconds between checks for commands queued in the log
            file by the ``eventbus`` command line (redrive, purge).
        concurrency: Handler calls of one subscription that may run at once (the
            default of ``subscribe(..., concurrency=)``); events of one key never run
            at once in an ordered subscription.
        workflow_concurrency: Workflow runs that may execute at the same time; the
            rest wait their turn.
        reconcile_interval: Seconds between reconciliation passes (the first runs
            just after open); 0 turns the periodic pass off (``bus.reconcile()``
            still works).
        reconcile_lease: Seconds a handler call may run before reconciliation
            cancels it as stuck (a failed attempt), and a retry may be overdue
            before it is re-armed; also bounds each run of a user reconciler.
        shared: A SQLite log shared by several processes of this machine: each
            publishes, one at a time dispatches, another takes over when it dies.
            Every process of the log must say so (a PostgreSQL log is always
            shared).
    """

    durability: Literal["normal", "full", "off"] = "normal"
    max_pending_publishes: int = 10_000
    max_event_bytes: int = 1024 * 1024
    channel_capacity: int = 4096
    max_commit_batch: int = 4096
    retention: float = 3600.0
    compact_interval: float = 30.0
    idempotency_retention: float = 7 * 86400.0
    busy_timeout: float = 5.0
    open_timeout: float = 10.0
    close_timeout: float = 10.0
    batch: BatchPolicy = msgspec.field(default_factory=BatchPolicy)
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    breaker: BreakerPolicy | None = msgspec.field(default_factory=BreakerPolicy)
    redrive_rate: float = 100.0
    control_interval: float = 1.0
    concurrency: int = 1
    workflow_concurrency: int = 100
    reconcile_interval: float = 60.0
    reconcile_lease: float = 300.0
    shared: bool = False

    def __post_init__(self) -> None:
        _check_types(self, "")
        _positive("redrive_rate", self.redrive_rate)
        _positive("control_interval", self.control_interval)
        for key in (
            "max_pending_publishes",
            "max_event_bytes",
            "channel_capacity",
            "max_commit_batch",
            "concurrency",
            "workflow_concurrency",
        ):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(key, f"must be at least 1, got {value}")
        for key in ("retention", "idempotency_retention", "reconcile_interval"):
            _positive(key, getattr(self, key), allow_zero=True)
        _positive("reconcile_lease", self.reconcile_lease)
        for key in ("compact_interval", "busy_timeout", "open_timeout", "close_timeout"):
            _positive(key, getattr(self, key))

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BusConfig:
        """Build a config from plain data (nested dicts for ``batch`` and ``retry``).

        Raises:
            ConfigError: A key is unknown or a value has the wrong type or range.
        """
        return _convert(data, cls, strict=True)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> BusConfig:
        """Read settings from the top level of a TOML file (``[batch]`` and
        ``[retry]`` tables for the nested policies).

        Raises:
            ConfigError: The file is missing or malformed, or a key is unknown or
                its value impossible.
        """
        return _convert(_read_toml(path), cls, strict=True)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> BusConfig:
        """Read ``EVENTBUS_<KEY>`` variables; nested keys use a double underscore
        (``EVENTBUS_BATCH__MAX_SIZE=256``). Keys are case-insensitive.

        Raises:
            ConfigError: An ``EVENTBUS_*`` variable names no setting, or its value
                does not parse.
        """
        return _convert(_read_env(environ), cls, strict=False)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> BusConfig:
        """Settings from a TOML file (as :meth:`from_toml`), overridden by the
        ``EVENTBUS_*`` environment variables (as :meth:`from_env`), key by key: with
        ``[retry] max_attempts = 7`` in the file and ``EVENTBUS_RETRY__TIMEOUT=2``
        in the environment, both apply; a key set in both takes the environment's.

        Args:
            path: The TOML file; None for the environment alone.
            environ: The variables to read; ``os.environ`` by default (``{}`` for
                the file alone).

        Raises:
            ConfigError: The file is missing or malformed, a key in either source
                is unknown, or a value impossible.
        """
        from_file = _read_toml(path) if path is not None else {}
        from_env = _read_env(environ)
        # Each source checked on its own first, so an error names where it came from.
        _convert(from_file, cls, strict=True)
        _convert(from_env, cls, strict=False)
        return _convert(_overlay(from_file, from_env), cls, strict=False)


def _read_toml(path: str | os.PathLike[str]) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(os.fspath(path), "no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(os.fspath(path), f"not valid TOML: {exc}") from exc


def _read_env(environ: Mapping[str, str] | None) -> dict[str, object]:
    env = os.environ if environ is None else environ
    data: dict[str, object] = {}
    for name, value in env.items():
        if not name.upper().startswith("EVENTBUS_"):
            continue
        path = name[len("EVENTBUS_") :].lower().split("__")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(name, "conflicts with another variable")
            node = child
        node[path[-1]] = None if value.lower() in ("none", "null") else value
    return data


def _overlay(base: Mapping[str, object], top: Mapping[str, object]) -> dict[str, object]:
    """``base`` with ``top``'s keys on it; nested tables merge key by key."""
    merged = dict(base)
    for key, value in top.items():
        under = merged.get(key)
        if isinstance(value, Mapping) and isinstance(under, Mapping):
            merged[key] = _overlay(under, value)
        else:
            merged[key] = value
    return merged


P = TypeVar("P", BatchPolicy, RetryPolicy, BreakerPolicy)


def merge_policy(override: P | Mapping[str, object] | None, default: P, key: str) -> P:
    """The policy a subscription runs with, from what ``subscribe`` was given.

    Args:
        override: None: ``default``, as is. A policy object: that policy, whole
            (its unset fields have the class defaults, not ``default``'s). A dict:
            ``default`` with the dict's fields changed (``{"max_attempts": 3}``).
        default: The bus's policy (``config.retry``, ``config.batch``, ...).
        key: The setting's name in error messages (``"retry"``).

    Raises:
        ConfigError: ``override`` is neither a policy, a dict nor None; or a key
            of the dict is unknown or its value impossible.
    """
    kind = type(default)
    if override is None:
        return default
    if isinstance(override, kind):
        return override
    if not isinstance(override, Mapping) or not all(isinstance(k, str) for k in override):
        raise ConfigError(
            key,
            f"must be a {kind.__name__}, a dict of the {kind.__name__} fields to change "
            f"in the bus's default, or None; got {type(override).__name__}",
        )
    current = msgspec.structs.asdict(default)
    return _convert({**current, **override}, kind, strict=True, prefix=key)


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def subscription_policies(
    config: BusConfig,
    batch: BatchPolicy | Mapping[str, object] | None,
    retry: RetryPolicy | Mapping[str, object] | None,
    breaker: BreakerPolicy | Mapping[str, object] | Literal["default"] | None,
) -> tuple[BatchPolicy, RetryPolicy, BreakerPolicy | None]:
    """The batch, retry and breaker policies of a subscription, from ``subscribe``'s
    arguments and the bus's ``config`` (see :func:`merge_policy`); ``breaker=None``
    turns the breaker off, ``"default"`` takes ``config.breaker``.

    Raises:
        ConfigError: An argument is of the wrong kind, or a dict's key is unknown or
            its value impossible.
    """
    if breaker == "default":
        breaker_policy = config.breaker
    elif breaker is None:
        breaker_policy = None
    else:
        breaker_policy = merge_policy(breaker, config.breaker or BreakerPolicy(), "breaker")
    return (
        merge_policy(batch, config.batch, "batch"),
        merge_policy(retry, config.retry, "retry"),
        breaker_policy,
    )


def _convert(data: Mapping[str, object], cls: type[T], *, strict: bool, prefix: str = "") -> T:
    try:
        return msgspec.convert(data, cls, strict=strict)
    except ConfigError:
        raise
    except msgspec.ValidationError as exc:
        message = str(exc)
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        where = _PATH.search(message)
        path = ".".join(p for p in (prefix, where.group(1) if where else "") if p)
        unknown = _UNKNOWN.search(message)
        if unknown:
            key = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise ConfigError(
                key, f"unknown setting; see {cls.__name__} for the valid keys"
            ) from None
        raise ConfigError(path or "<config>", message.split(" - at ")[0]) from None
