"""One owner per SQLite log, however the file is reached (or, for a log shared by
the processes of one machine, one dispatcher at a time: :class:`ShareLock`).

Two advisory ``flock`` locks, both released by the kernel when the owner dies, so a
``kill -9`` never leaves the log locked:

- ``<real path>.lock``, next to the file the path resolves to, so a symlink, a
  relative path or a bind mount of the directory (from another container too)
  finds the same lock;
- ``<temp dir>/eventbus-<uid>/<device>-<inode>.inode.lock``, named after the log
  file itself, so another name for it (a hard link, which may sit in another
  directory) finds it too. The owner removes it when it lets go; only processes of
  one user that share the temp directory see it, and the first lock still covers
  every path to the same directory.

Neither is taken on the database file: closing any descriptor of that file would
drop the POSIX locks SQLite holds on it in this process.

The owner writes ``pid <n>`` into both once it holds both, and clears them when it
lets go (``<real path>.lock`` stays, empty). A process that finds a lock taken reads
the pid there, and retries for a moment while that file is still empty (the owner
took it but has not written yet) or names a process that is gone (an owner killed
before it could clear it), so that the ``LogLocked`` it raises names the live owner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import sys
import tempfile
import time

from ._errors import LogDirectoryMissing, LogLocked, StorageError, UnsupportedPlatform

try:
    import fcntl
except ImportError:  # not a POSIX system
    _POSIX = False
else:
    _POSIX = True

logger = logging.getLogger("eventbus.storage")

# How long a process that found the log owned keeps reading the lock for the owner's
# pid. The owner writes it microseconds after it takes the lock; this is ample.
OWNER_WAIT = 2.0
_RETRY = 0.005
_PID = re.compile(rb"pid (\d+)\n")  # the newline: written in full, not half-way
_OLD_PID = re.compile(rb"pid (\d+)")


class LogOwnership:
    """The right to write one SQLite log, held by at most one process at a time.

    Args:
        path: The log file, as the caller named it (relative, or through links).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._held: list[tuple[str, int]] = []  # (lock file, descriptor), in order taken

    def acquire(self) -> None:
        """Take the log (blocking: call it from a worker thread).

        Creates the log file, empty, if it does not exist yet: its device and inode
        name the second lock.

        Raises:
            LogLocked: Another process (or another bus in this one) owns the log; it
                names that process's pid.
            LogDirectoryMissing: The directory of the log does not exist.
            UnsupportedPlatform: No ``flock`` here (Windows).
            StorageError: A lock file cannot be created or opened (permissions).
        """
        if not _POSIX:
            raise UnsupportedPlatform(self.path, sys.platform)
        real = os.path.realpath(self.path)
        directory = os.path.dirname(real)
        if not os.path.isdir(directory):
            raise LogDirectoryMissing(self.path, directory)
        deadline = time.monotonic() + OWNER_WAIT
        while True:
            try:
                found = self._try(real)
            except OSError as exc:
                raise StorageError(
                    f"cannot take the lock of the log {self.path!r}: {exc}. The log's "
                    "directory must be writable by this process (SQLiteStorage("
                    "read_only=True) inspects a log without it)"
                ) from exc
            if found is None:
                return
            pid = int(match.group(1)) if (match := _PID.search(found)) else None
            if pid is not None and _alive(pid):
                raise LogLocked(self.path, f"pid {pid}", pid)
            if time.monotonic() >= deadline:
                if pid is None and (match := _OLD_PID.fullmatch(found)):
                    pid = int(match.group(1))  # written by an earlier version
                    raise LogLocked(self.path, f"pid {pid}", pid)
                owner = "unknown" if pid is None else f"pid {pid}, which is not running here"
                raise LogLocked(self.path, owner, pid)
            time.sleep(_RETRY)  # on a worker thread, never on the event loop

    def release(self) -> None:
        """Clear the pid and let go of both locks. Idempotent."""
        while self._held:
            path, fd = self._held.pop()
            try:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    if _same_file(path, fd) and path.endswith(_INODE_SUFFIX):
                        os.unlink(path)  # under the lock: see _take
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _try(self, real: str) -> bytes | None:
        """Take both locks and write the pid: None. Or, if one is taken, hold
        neither and return what its file says."""
        found = self._take(real + ".lock")
        if found is not None:
            return found
        try:
            inode_lock = _inode_lock(real)
            if inode_lock is not None:
                found = self._take(inode_lock)
                if found is not None:
                    self.release()
                    return found
            line = f"pid {os.getpid()}\n".encode()
            for _, fd in self._held:
                os.ftruncate(fd, 0)
                os.pwrite(fd, line, 0)
        except BaseException:
            self.release()
            raise
        return None

    def _take(self, path: str) -> bytes | None:
        """Lock ``path`` (created if missing): None, and the lock is held. Or, if
        another descriptor holds it, the file's contents.

        A lock file may be unlinked by its owner on release; locking a file that is
        no longer at ``path`` would lock nothing, so the check after ``flock``
        starts again if the file there changed."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return os.pread(fd, 64, 0)
                finally:
                    os.close(fd)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(path, fd):
                self._held.append((path, fd))
                return None
            os.close(fd)


_INODE_SUFFIX = ".inode.lock"


def _inode_lock(real: str) -> str | None:
    """The lock named after the log file's device and inode, in a directory private
    to this user; None if that directory is not safe to use (then only the lock
    next to the file protects the log)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    info = os.stat(real)
    directory = os.path.join(tempfile.gettempdir(), f"eventbus-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    mode = os.lstat(directory)
    if not stat.S_ISDIR(mode.st_mode) or mode.st_uid != os.getuid() or mode.st_mode & 0o077:
        logger.warning(
            "%s is not a private directory of this user; the log %s is locked by its "
            "path only, so a hard link to it could open a second owner",
            directory,
            real,
        )
        return None
    return os.path.join(directory, f"{info.st_dev}-{info.st_ino}{_INODE_SUFFIX}")


def _same_file(path: str, fd: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class ShareLock:
    """Whether a SQLite log is shared by several processes, or owned by one.

    Processes that share the log (``SQLiteStorage(shared=True)``) each hold
    ``<real path>.share`` with a shared ``flock``; a process that owns it alone holds
    it exclusively (beside :class:`LogOwnership`). So the two never mix: a process
    owning the log alone would not look for events other processes append.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def acquire(self, *, shared: bool) -> None:
        """Take the lock (blocking: call it from a worker thread).

        Raises:
            LogLocked: ``shared`` and one process owns the log alone, or not
                ``shared`` and processes share it.
        """
        if not _POSIX:
            raise UnsupportedPlatform(self.path, sys.platform)
        real = os.path.realpath(self.path)
        fd = os.open(real + ".share", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if shared:
                owner = _owner_of(real + ".lock")
                raise LogLocked(
                    self.path,
                    owner,
                    None,
                    advice="that process owns the log alone (it was opened without "
                    "shared=True); open every process of the log with "
                    "BusConfig(shared=True), or none",
                ) from None
            raise LogLocked(
                self.path,
                "processes sharing it",
                None,
                advice="they opened it with BusConfig(shared=True): open this one so too, "
                "to publish beside them and dispatch in turn",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Let go. Idempotent."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def _owner_of(lock: str) -> str:
    try:
        with open(lock, "rb") as f:
            found = f.read(64)
    except OSError:
        return "unknown"
    match = _PID.search(found) or _OLD_PID.fullmatch(found)
    return f"pid {int(match.group(1))}" if match else "unknown"
