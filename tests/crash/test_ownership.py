"""One owner per log file, however it is reached, and a refusal that names the live
owner: real processes on real files, started at the same instant."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

import eventbus.storage._ownership
from eventbus import Bus, LogDirectoryMissing, LogLocked

CONTENDER = textwrap.dedent(
    """
    import os, sys
    import anyio, eventbus

    async def main():
        print("ready", flush=True)
        sys.stdin.readline()  # the parent says go to both at once
        try:
            async with eventbus.Bus.open(sys.argv[1]) as bus:
                await bus.publish("t", os.getpid())
                print("owner", os.getpid(), flush=True)
                await anyio.to_thread.run_sync(sys.stdin.readline)  # until told to exit
        except eventbus.LogLocked as exc:
            print("refused", exc.owner, flush=True)  # "pid 1234"

    anyio.run(main)
    """
)


def contend(first: str, second: str, cwd: Path) -> tuple[list[str], list[str]]:
    """Start two processes opening ``first`` and ``second``, release them at the same
    instant, and return each one's report (``owner <pid>`` or ``refused <pid> ...``)
    with its pid."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, path],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for path in (first, second)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = []
        for proc in procs:
            assert proc.stdout is not None
            reports.append([*proc.stdout.readline().split(), str(proc.pid)])
        for proc, report in zip(procs, reports, strict=True):
            if report[0] == "owner":  # a refused process has already exited
                assert proc.stdin is not None
                proc.stdin.write("exit\n")
                proc.stdin.flush()
        for proc in procs:
            assert proc.wait(timeout=30) == 0
        return reports[0], reports[1]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(BrokenPipeError):
                        pipe.close()


def same_log_two_ways(tmp_path: Path, way: str) -> tuple[str, str]:
    log = tmp_path / "log.db"
    if way == "symlink":
        (tmp_path / "link.db").symlink_to(log)
        return str(log), str(tmp_path / "link.db")
    if way == "relative path":
        (tmp_path / "sub").mkdir()
        return str(log), os.path.join("sub", "..", "log.db")  # resolved from cwd=tmp_path
    assert way == "hard link in another directory"
    log.touch()  # a hard link needs the file
    (tmp_path / "elsewhere").mkdir()
    os.link(log, tmp_path / "elsewhere" / "hard.db")
    return str(log), str(tmp_path / "elsewhere" / "hard.db")


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(4))
@pytest.mark.parametrize("way", ["symlink", "relative path", "hard link in another directory"])
def test_two_processes_opening_one_log_two_ways_at_once_get_one_owner(
    tmp_path: Path, way: str, attempt: int
) -> None:
    # Regression: the lock file was named after the path as given, so a symlink (or a
    # hard link) opened a second owner: 1,456 of 1,500 events were handled twice. And
    # the refused process often named no owner ("unknown") or a dead one.
    first, second = same_log_two_ways(tmp_path, way)
    reports = contend(first, second, cwd=tmp_path)
    owners = [r for r in reports if r[0] == "owner"]
    refused = [r for r in reports if r[0] == "refused"]
    assert len(owners) == 1, reports
    assert len(refused) == 1, reports
    owner_pid = owners[0][1]
    assert owners[0][-1] == owner_pid
    assert refused[0][1:3] == ["pid", owner_pid], f"the refusal named {refused[0][1:-1]}"


@pytest.mark.anyio
async def test_a_log_in_a_missing_directory_names_the_directory(tmp_path: Path) -> None:
    # Regression: a raw FileNotFoundError about "app.db.lock".
    missing = tmp_path / "no" / "such"
    with pytest.raises(LogDirectoryMissing) as info:
        async with Bus.open(missing / "app.db"):
            pass
    assert info.value.directory == str(missing)
    assert str(missing) in str(info.value)
    assert not (tmp_path / "no").exists()


@pytest.mark.anyio
async def test_the_owner_clears_its_pid_when_it_closes(tmp_path: Path) -> None:
    # Regression: the pid stayed in the lock file after the owner closed, so a later
    # refusal could name an owner long gone.
    log = tmp_path / "log.db"
    async with Bus.open(log):
        assert (tmp_path / "log.db.lock").read_text() == f"pid {os.getpid()}\n"
    assert (tmp_path / "log.db.lock").read_text() == ""


@pytest.mark.anyio
async def test_a_stale_pid_of_a_dead_owner_is_not_named_as_the_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock is held (as by an owner that has not written its pid yet) and the file
    # still names an owner killed earlier: the refusal must not present it as live.
    monkeypatch.setattr(eventbus.storage._ownership, "OWNER_WAIT", 0.2)
    finished = await anyio.run_process([sys.executable, "-c", "import os; print(os.getpid())"])
    dead_pid = int(finished.stdout)
    lock = tmp_path / "log.db.lock"
    lock.write_text(f"pid {dead_pid}\n")
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LogLocked) as info:
            async with Bus.open(tmp_path / "log.db"):
                pass
        assert info.value.owner == f"pid {dead_pid}, which is not running here"
    finally:
        os.close(fd)


HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys

    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken, its pid not written yet
    print("locked", flush=True)
    sys.stdin.readline()
    os.pwrite(fd, f"pid {os.getpid()}\\n".encode(), 0)
    sys.stdin.readline()  # until told to exit
    """
)


class _TellOnFirstSleep:
    """The ownership module's clock, with a sleep that runs ``tell`` once, the first
    time the contender waits to read the lock again."""

    def __init__(self, tell: Callable[[], None]) -> None:
        self.tell: Callable[[], None] | None = tell
        self.monotonic = time.monotonic

    def sleep(self, seconds: float) -> None:
        if self.tell is not None:
            tell, self.tell = self.tell, None
            tell()
        time.sleep(seconds)


def test_an_owner_that_has_not_written_its_pid_yet_is_named_once_it_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the lock was taken first and the pid written after it, and a
    # contender that read the file in between named the owner "unknown" (9 times in
    # 20 when two processes started at once). Here the owner is made to write only
    # once the contender has read the empty file.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "log.db.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stdin, stdout = holder.stdin, holder.stdout
    assert stdin is not None
    assert stdout is not None

    def write_the_pid_now() -> None:
        stdin.write("write\n")
        stdin.flush()

    async def open_it() -> LogLocked:
        with anyio.fail_after(10), pytest.raises(LogLocked) as info:
            async with Bus.open(tmp_path / "log.db"):
                pass
        return info.value

    try:
        assert stdout.readline() == "locked\n"
        clock = _TellOnFirstSleep(write_the_pid_now)
        monkeypatch.setattr(eventbus.storage._ownership, "time", clock)
        refused = anyio.run(open_it)
        assert (refused.owner, refused.pid) == (f"pid {holder.pid}", holder.pid)
        assert clock.tell is None, "the contender never found the lock file empty"
    finally:
        with contextlib.suppress(BrokenPipeError):
            stdin.write("exit\n")
            stdin.close()
        assert holder.wait(timeout=30) == 0
        stdout.close()


@pytest.mark.anyio
async def test_a_second_bus_in_one_process_is_refused_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "link.db").symlink_to(tmp_path / "log.db")
    async with Bus.open(tmp_path / "log.db") as bus:
        with pytest.raises(LogLocked) as info:
            async with Bus.open(tmp_path / "link.db"):
                pass
        assert info.value.pid == os.getpid()
        await bus.publish("t", 1)  # the owner is unharmed


def test_without_flock_import_works_and_a_log_file_says_it_needs_posix(tmp_path: Path) -> None:
    # Regression: "import eventbus" failed on Windows with a bare "No module named
    # 'fcntl'". Simulated here by hiding fcntl.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["fcntl"] = None  # as on Windows
        import anyio, eventbus

        async def main():
            async with eventbus.Bus.open(":memory:") as bus:
                await bus.publish("t", 1)
            try:
                async with eventbus.Bus.open({str(tmp_path / "log.db")!r}):
                    pass
            except eventbus.UnsupportedPlatform as exc:
                print(type(exc).__name__, isinstance(exc, eventbus.BusError), exc)

        anyio.run(main)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    assert out.startswith("UnsupportedPlatform True ")
    assert "needs a POSIX system" in out


@pytest.mark.anyio
async def test_two_owners_in_sequence_each_get_the_log(tmp_path: Path) -> None:
    # Releasing removes the inode lock file; the next owner must still be exclusive.
    (tmp_path / "link.db").symlink_to(tmp_path / "log.db")
    for path in ("log.db", "link.db", "log.db"):
        async with Bus.open(tmp_path / path) as bus:
            await bus.publish("t", path)
            with pytest.raises(LogLocked):
                async with Bus.open(tmp_path / "log.db"):
                    pass
    with anyio.fail_after(10):
        async with Bus.open(tmp_path / "log.db") as bus:
            assert (await bus.stats()).head == 3
