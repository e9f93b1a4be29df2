"""Which local processes hold SQLite's write lock on a log, from ``/proc/locks``.

SQLite does not say who holds a lock, but on Linux the kernel lists every POSIX lock
with its owner's pid. In WAL mode a writer holds an exclusive lock on byte 120 of the
``-shm`` file (``WAL_WRITE_LOCK``, the first of the locks that start at offset 120 in
SQLite's ``os_unix.c``); in rollback-journal mode it locks the database file itself.
Elsewhere (no ``/proc/locks``) nothing can be seen and the answer is empty.
"""

from __future__ import annotations

import os

_PROC_LOCKS = "/proc/locks"
# The WAL write lock: the first byte of the lock region of the -shm file.
_WAL_WRITE_LOCK = 120


def _identity(path: str) -> tuple[str, int] | None:
    """The ``MAJOR:MINOR`` (hex, as ``/proc/locks`` prints them) and inode of ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", st.st_ino


def _covers(start: str, end: str, offset: int) -> bool:
    try:
        return int(start) <= offset and (end == "EOF" or int(end) >= offset)
    except ValueError:
        return False


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            name = f.read().strip()
    except OSError:
        name = ""
    me = ", this process" if pid == os.getpid() else ""
    return f"pid {pid} ({name}{me})" if name else f"pid {pid}{me}"


def write_lock_holders(path: str) -> tuple[str, ...]:
    """The processes holding a write lock on the log at ``path``, described as
    ``"pid 4242 (sqlite3)"``. Blocking (reads ``/proc``): run it in a thread."""
    targets: dict[tuple[str, int], int | None] = {}
    shm = _identity(path + "-shm")
    if shm is not None:
        targets[shm] = _WAL_WRITE_LOCK
    db = _identity(path)
    if db is not None:
        targets[db] = None  # any byte: rollback-journal locks
    try:
        with open(_PROC_LOCKS) as f:
            lines = f.readlines()
    except OSError:
        return ()
    pids: list[int] = []
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 8:
            continue  # a process waiting for a lock, not holding one
        kind, mode, pid_text, where, start, end = fields[1], *fields[3:8]
        device, _, inode = where.rpartition(":")
        if kind not in ("POSIX", "OFDLCK") or mode != "WRITE" or not inode.isdigit():
            continue
        key = (device, int(inode))
        if key not in targets:
            continue
        offset = targets[key]
        if offset is not None and not _covers(start, end, offset):
            continue
        try:
            pid = int(pid_text)
        except ValueError:
            continue
        if pid > 0 and pid not in pids:
            pids.append(pid)
    return tuple(_describe(pid) for pid in pids)
