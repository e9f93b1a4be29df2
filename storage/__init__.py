"""The event log: an ordered, durable store of events, cursors and dead letters.

Imports nothing from the rest of the project. :class:`Storage` is the contract;
:class:`SQLiteStorage` the embedded default, :class:`PostgresStorage` the log in a
PostgreSQL database (it needs asyncpg, the ``postgres`` extra, and is imported only
when first used) and :class:`MemoryStorage` an in-process log with no durability.
"""

from typing import TYPE_CHECKING

from ._calls import CallSlots, NoCallSlots
from ._errors import (
    CorruptLog,
    LeaseLost,
    LogBusy,
    LogDirectoryMissing,
    LogLocked,
    NotALog,
    RecordRejected,
    RunClaimLost,
    SchemaTooNew,
    StorageClosed,
    StorageError,
    StorageFull,
    UnsupportedPlatform,
)
from ._memory import MemoryStorage
from ._pg_url import is_postgres_url
from ._protocol import SharedLog, Storage
from ._schema import SCHEMA_VERSION
from ._sqlite import Durability, SQLiteStorage
from ._sqlite_shared import SharedSQLiteStorage
from ._statements import submit_control
from ._types import (
    PROCESS_DIED,
    WORKFLOW_PREFIX,
    Claim,
    DeadRecord,
    Lease,
    LogStats,
    NewRecord,
    Notice,
    Receipt,
    Record,
    RetryRecord,
    Share,
    StepRecord,
    SubscriptionInfo,
    Unaccounted,
    WorkflowRecord,
    WriteBatch,
)

if TYPE_CHECKING:
    from ._postgres import PostgresStorage


def __getattr__(name: str) -> object:
    # PostgresStorage imports asyncpg, an optional dependency: only when asked for.
    if name == "PostgresStorage":
        try:
            from ._postgres import PostgresStorage
        except ImportError as exc:
            raise ImportError(
                f"a PostgreSQL log needs asyncpg ({exc}); install it with "
                "pip install 'eventbus[postgres]'"
            ) from exc
        return PostgresStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PROCESS_DIED",
    "WORKFLOW_PREFIX",
    "CallSlots",
    "Claim",
    "SCHEMA_VERSION",
    "CorruptLog",
    "DeadRecord",
    "Durability",
    "Lease",
    "LeaseLost",
    "LogBusy",
    "LogDirectoryMissing",
    "LogLocked",
    "LogStats",
    "MemoryStorage",
    "NoCallSlots",
    "NewRecord",
    "NotALog",
    "Notice",
    "PostgresStorage",
    "Receipt",
    "Record",
    "RecordRejected",
    "RunClaimLost",
    "RetryRecord",
    "SQLiteStorage",
    "SharedSQLiteStorage",
    "SchemaTooNew",
    "Share",
    "SharedLog",
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
    "is_postgres_url",
    "submit_control",
]
