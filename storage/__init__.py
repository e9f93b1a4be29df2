"""The event log: an ordered, durable store of events, cursors and dead letters.

Imports nothing from the rest of the project. :class:`Storage` is the contract;
:class:`SQLiteStorage` the embedded default and :class:`MemoryStorage` an in-process
log with no durability.
"""

from ._calls import CallSlots, NoCallSlots
from ._errors import (
    CorruptLog,
    LogBusy,
    LogDirectoryMissing,
    LogLocked,
    NotALog,
    RecordRejected,
    SchemaTooNew,
    StorageClosed,
    StorageError,
    StorageFull,
    UnsupportedPlatform,
)
from ._memory import MemoryStorage
from ._protocol import Storage
from ._schema import SCHEMA_VERSION
from ._sqlite import Durability, SQLiteStorage
from ._statements import submit_control
from ._types import (
    PROCESS_DIED,
    WORKFLOW_PREFIX,
    DeadRecord,
    LogStats,
    NewRecord,
    Receipt,
    Record,
    RetryRecord,
    StepRecord,
    SubscriptionInfo,
    Unaccounted,
    WorkflowRecord,
    WriteBatch,
)

__all__ = [
    "PROCESS_DIED",
    "WORKFLOW_PREFIX",
    "CallSlots",
    "SCHEMA_VERSION",
    "CorruptLog",
    "DeadRecord",
    "Durability",
    "LogBusy",
    "LogDirectoryMissing",
    "LogLocked",
    "LogStats",
    "MemoryStorage",
    "NoCallSlots",
    "NewRecord",
    "NotALog",
    "Receipt",
    "Record",
    "RecordRejected",
    "RetryRecord",
    "SQLiteStorage",
    "SchemaTooNew",
    "Storage",
    "StorageClosed",
    "StorageError",
    "StepRecord",
    "StorageFull",
    "SubscriptionInfo",
    "Unaccounted",
    "UnsupportedPlatform",
    "WorkflowRecord",
    "WriteBatch",
    "submit_control",
]
