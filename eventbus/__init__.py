"""eventbus: a durable, adaptive, in-process event bus for asyncio.

Events are appended to a write-ahead log in SQLite (or kept in memory), delivered to
subscriptions in batches whose size adapts to load, and acknowledged in the same
transaction as the handlers' outbox publishes.

    async with Bus.open("app.db") as bus:
        @bus.subscribe("orders", name="billing")
        async def bill(event: Event, ctx: Context) -> None: ...

        await bus.publish("orders", {"amount": 5}, key="o-1")
"""

from eventbus.storage import LogStats

from ._bus import Bus, Reconciliation
from ._config import BatchPolicy, BreakerPolicy, BusConfig, RetryPolicy
from ._effects import idempotent
from ._errors import (
    BusClosed,
    BusError,
    BusFull,
    ConfigError,
    CorruptLog,
    DrainTimeout,
    EventTooLarge,
    HandlerStuck,
    HookError,
    HookFailed,
    InvalidEvent,
    LogBusy,
    LogDirectoryMissing,
    LogLocked,
    NotALog,
    PayloadError,
    PayloadValidationError,
    SchemaTooNew,
    StorageError,
    StorageFull,
    SubscriptionError,
    UnsupportedPlatform,
    WrongEventLoop,
)
from ._event import Event, Message, Receipt
from ._hooks import HandlerCall, Hook, Hooks, Publishing
from ._metrics import (
    BusMetrics,
    Histogram,
    LatencySummary,
    LogMetrics,
    ReconcileMetrics,
    SubscriptionMetrics,
    WorkflowMetrics,
)
from ._run import run
from .dispatch import Context, State, StateReader
from .failures import DeadLetter, DeadLettered, DeadLetterPage, DeadLetters
from .reconcile import ReconcileReport, ReconcilerResult, Repairs, SubscriptionReport
from .workflows import (
    StepFailed,
    StepInfo,
    StepStatus,
    Workflow,
    WorkflowCancelled,
    WorkflowError,
    WorkflowFailed,
    WorkflowHandle,
    WorkflowIncompatible,
    WorkflowStatus,
    current_step,
)

__all__ = [
    "BatchPolicy",
    "BreakerPolicy",
    "Bus",
    "BusClosed",
    "BusConfig",
    "BusError",
    "BusFull",
    "BusMetrics",
    "ConfigError",
    "Context",
    "CorruptLog",
    "DeadLetter",
    "DeadLetterPage",
    "DeadLettered",
    "DeadLetters",
    "DrainTimeout",
    "Event",
    "EventTooLarge",
    "HandlerCall",
    "HandlerStuck",
    "Histogram",
    "Hook",
    "HookError",
    "HookFailed",
    "Hooks",
    "InvalidEvent",
    "LatencySummary",
    "LogBusy",
    "LogDirectoryMissing",
    "LogLocked",
    "LogMetrics",
    "LogStats",
    "Message",
    "NotALog",
    "PayloadError",
    "PayloadValidationError",
    "Publishing",
    "Receipt",
    "ReconcileMetrics",
    "ReconcileReport",
    "ReconcilerResult",
    "Reconciliation",
    "Repairs",
    "RetryPolicy",
    "SchemaTooNew",
    "State",
    "StateReader",
    "StepFailed",
    "StepInfo",
    "StepStatus",
    "StorageError",
    "StorageFull",
    "SubscriptionError",
    "SubscriptionMetrics",
    "SubscriptionReport",
    "UnsupportedPlatform",
    "Workflow",
    "WorkflowCancelled",
    "WorkflowError",
    "WorkflowFailed",
    "WorkflowHandle",
    "WorkflowIncompatible",
    "WorkflowMetrics",
    "WorkflowStatus",
    "WrongEventLoop",
    "current_step",
    "idempotent",
    "run",
]
