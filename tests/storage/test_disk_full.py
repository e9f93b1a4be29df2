"""A full disk: the publish fails with StorageFull, nothing partial is kept, and the
bus keeps serving and recovers once space returns. Uses a real, tiny tmpfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventbus import Bus, Context, Event, StorageError, StorageFull
from eventbus.storage import SQLiteStorage

pytestmark = pytest.mark.anyio


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_fails_the_publish_and_the_bus_recovers(tiny_fs: Path) -> None:
    path = tiny_fs / "log.db"
    ballast = tiny_fs / "ballast"
    handled: list[int] = []
    accepted: list[int] = []
    async with Bus.open(path) as bus:

        @bus.subscribe("t", name="s")
        async def handler(event: Event[dict[str, object]], ctx: Context) -> None:
            handled.append(int(event.payload["n"]))  # type: ignore[call-overload]

        ballast.write_bytes(b"\0" * (512 * 1024))  # space we can give back later
        failure: StorageError | None = None
        for n in range(1000):
            try:
                await bus.publish("t", {"n": n, "blob": os.urandom(20_000)})
            except StorageError as exc:
                failure = exc
                break
            accepted.append(n)
        assert isinstance(failure, StorageFull)
        assert "full" in str(failure)
        assert 0 < len(accepted) < 1000
        ballast.unlink()
        # Serving again: the next publish commits.
        receipt = await bus.publish("t", {"n": 10_000, "blob": b""})
        await bus.drain(timeout=30)
    assert sorted(handled) == [*accepted, 10_000]
    store = SQLiteStorage(path, read_only=True)
    await store.open()
    try:
        rows = await store.read(0, 10**9, None, 10**6)
    finally:
        await store.close()
    # Nothing partial: exactly the accepted events, then the one after recovery.
    assert len(rows) == len(accepted) + 1
    assert rows[-1].seq == receipt.seq
