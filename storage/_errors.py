"""The storage error tree.

::

    StorageError                 the log could not do what was asked
    ├── LogLocked                another process owns the log file
    ├── LogBusy                  a lock held by another connection outlasted busy_timeout
    ├── LogDirectoryMissing      the directory that should hold the log does not exist
    ├── UnsupportedPlatform      a file log needs a POSIX system (its lock)
    ├── NotALog                  the file exists but is not an event log
    ├── CorruptLog               the file is damaged (SQLite refuses it)
    ├── SchemaTooNew             written by a newer version of this library
    ├── StorageFull              the disk (or quota) is full
    ├── RecordRejected           the database refused a value of one write
    ├── LeaseLost                a subscription's partitions changed hands (fencing)
    └── StorageClosed            the storage was closed

The bus re-raises each of these as its own subclass of ``eventbus.BusError``.
"""

from __future__ import annotations


class StorageError(Exception):
    """The log could not carry out an operation. Nothing partial was written."""


class LogLocked(StorageError):
    """Another process owns the log: it holds the log's lock file (SQLite) or its
    ownership lock (PostgreSQL).

    Attributes:
        path: The log, as it was given (a URL without its password).
        owner: Who owns it, as ``"pid 1234"`` (or ``"unknown"``); on PostgreSQL also
            the owner's host and database session.
        pid: The owner's process id, when known (and, on PostgreSQL, on this host).
    """

    def __init__(
        self, path: str, owner: str, pid: int | None = None, *, advice: str | None = None
    ) -> None:
        self.path = path
        self.owner = owner
        self.pid = pid
        super().__init__(
            f"the log {path!r} is owned by another process ({owner}); "
            + (
                advice
                or "it opened the SQLite log without shared=True, so it runs alone on "
                "it. Stop that process, or use a different file. For several processes "
                "on one log, open it with BusConfig(shared=True) in every process of "
                "this machine, or move it to PostgreSQL (eventbus migrate FILE "
                "postgresql://...). The eventbus command line reads the log (and queues "
                "redrive, purge and drop for its owner) while it runs"
            )
        )


class LogDirectoryMissing(StorageError):
    """The directory that should hold the log does not exist (or is not a directory);
    nothing was created."""

    def __init__(self, path: str, directory: str) -> None:
        self.path = path
        self.directory = directory
        super().__init__(
            f"cannot open the log {path!r}: the directory {directory!r} does not exist "
            "or is not a directory. Create it first, or check the path"
        )


class UnsupportedPlatform(StorageError):
    """A log file needs a POSIX system: its single owner is enforced with ``flock``."""

    def __init__(self, path: str, platform: str) -> None:
        self.path = path
        self.platform = platform
        super().__init__(
            f"cannot open the log {path!r}: a SQLite log needs a POSIX system (Linux, "
            f"macOS, BSD) for the lock that keeps it to one owner, and this is "
            f"{platform!r}. Use Bus.open(':memory:') here, or run under WSL"
        )


class NotALog(StorageError):
    """The file is a database (or something else) that this library did not create."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"{path!r} is not an event log ({detail}); point Bus.open at a new path or "
            "at a file an event bus created"
        )


class CorruptLog(StorageError):
    """SQLite reports the file as damaged or not a database at all."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"{path!r} cannot be read as an event log: {detail}. Restore it from a "
            "backup, or move it aside to start a new log"
        )


class SchemaTooNew(StorageError):
    """The log was written by a newer version of this library."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"{path!r} has schema version {found}, but this version of eventbus reads "
            f"up to {supported}; upgrade eventbus to open it"
        )


class LogBusy(StorageError):
    """Another connection held SQLite's write lock for longer than ``busy_timeout``.

    Retryable: nothing was written, and the same write succeeds once the lock is
    released.

    Attributes:
        path: The log file.
        waited: Seconds the write waited for the lock.
        holders: The local processes seen holding the lock (``"pid 4242 (sqlite3)"``);
            empty when none can be seen.
    """

    def __init__(self, path: str, waited: float, holders: tuple[str, ...] = ()) -> None:
        self.path = path
        self.waited = waited
        self.holders = holders
        held = (
            f", held by {', '.join(holders)}"
            if holders
            else " (no other local process is seen holding it: another connection of "
            "this process, or a process in another container)"
        )
        super().__init__(
            f"the log {path!r} stayed locked by another connection for {waited:.3g}s "
            f"(busy_timeout){held}; nothing was written. This is retryable: try again "
            "once that connection commits or closes, or raise busy_timeout to wait longer"
        )


class StorageFull(StorageError):
    """The disk is full: the write was rolled back and can be retried once space returns."""


class RecordRejected(StorageError):
    """The database refused a value in a write (a type or size it cannot store); the
    transaction was rolled back. Unlike the other errors this says nothing about the
    log itself: the other records of a group commit can be committed without it."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"the log {path!r} refused a value of this write ({detail}); nothing was "
            "written. Check the types of what was published"
        )


class RunClaimLost(RecordRejected):
    """A write of workflow runs that this process no longer holds the claim of (on a
    log shared by processes: its claim expired while it was paused or cut off, and
    another process took the runs over): nothing of the write was committed. The
    other records of a group commit can be committed without it.

    Attributes:
        path: The log.
        runs: The ids of the runs whose claim was lost.
    """

    def __init__(self, path: str, runs: tuple[str, ...]) -> None:
        self.runs = runs
        StorageError.__init__(
            self,
            f"this process no longer holds workflow run(s) {', '.join(map(repr, runs))} on "
            f"{path!r}: another process took them over after its claim expired; nothing "
            "was written. That process runs them now",
        )
        self.path = path
        self.detail = "claim lost"


class StorageClosed(StorageError):
    """The storage was closed; open a new one."""


class LeaseLost(StorageError):
    """A write batch carried the lease of a subscription's partitions that this
    process no longer holds (its lease expired while it was paused or cut off, and
    another process took them over): nothing of the batch was written.

    This is fencing at work, not a fault of the log: the other process handles those
    events now. The writes of the subscriptions named are dropped (their events are
    handled again by the new holder, so no effect is applied twice); the rest of the
    batch can be committed without them.

    Attributes:
        path: The log.
        subscriptions: The subscriptions whose lease was lost.
    """

    def __init__(self, path: str, subscriptions: tuple[str, ...]) -> None:
        self.path = path
        self.subscriptions = subscriptions
        super().__init__(
            f"this process no longer holds the partitions it wrote for "
            f"{', '.join(map(repr, subscriptions))} on {path!r}: another process took "
            "them over after its lease expired; nothing was written. Its events are "
            "handled by that process now"
        )
