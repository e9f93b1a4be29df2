"""Bad publish arguments: a typed error for the caller, nothing written, and nobody
else's publish affected."""

from __future__ import annotations

import asyncio
import os
import threading
import tracemalloc
import warnings
from pathlib import Path

import anyio
import pytest

from eventbus import (
    Bus,
    BusConfig,
    BusError,
    EventTooLarge,
    InvalidEvent,
    Message,
    PayloadError,
    Receipt,
    WrongEventLoop,
)
from eventbus.storage import SQLiteStorage

pytestmark = pytest.mark.anyio


async def logged_payload_count(path: Path) -> int:
    store = SQLiteStorage(path, read_only=True)
    await store.open()
    try:
        return len(await store.read(0, 10**9, None, 10**6))
    finally:
        await store.close()


async def test_a_list_idempotency_key_fails_its_own_publish_and_no_one_elses(
    log_path: Path,
) -> None:
    # Regression: the list reached SQLite inside the shared group commit; none of the
    # 40 good publishes in that commit succeeded and the publish_nowait events queued
    # with them were dropped.
    receipts: list[Receipt] = []
    errors: list[BaseException] = []

    async def good(i: int) -> None:
        receipts.append(await bus.publish("orders", {"n": i}, idempotency_key=f"good-{i}"))

    async def bad() -> None:
        try:
            await bus.publish("orders", {"n": -1}, idempotency_key=["x"])  # type: ignore[arg-type]
        except BusError as exc:
            errors.append(exc)

    async with Bus.open(log_path) as bus:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(good, i)
            tg.start_soon(bad)
            for i in range(20, 40):
                tg.start_soon(good, i)
            for i in range(10):
                bus.publish_nowait("orders", {"nowait": i})
        await bus.drain(timeout=10)
    assert len(receipts) == 40
    assert len(errors) == 1
    assert isinstance(errors[0], InvalidEvent)
    assert errors[0].field == "idempotency_key"
    assert await logged_payload_count(log_path) == 50


async def test_an_int_idempotency_key_is_refused_instead_of_aliasing_its_string() -> None:
    # Regression: idempotency_key=123 was accepted and matched the string "123".
    async with Bus.open(":memory:") as bus:
        first = await bus.publish("t", 1, idempotency_key="123")
        with pytest.raises(InvalidEvent, match="idempotency_key must be a str or None"):
            await bus.publish("t", 2, idempotency_key=123)  # type: ignore[arg-type]
        with pytest.raises(InvalidEvent):
            bus.publish_nowait("t", 2, idempotency_key=b"123")  # type: ignore[arg-type]
        with pytest.raises(InvalidEvent):
            await bus.publish_many([Message("t", 2, idempotency_key=123)])  # type: ignore[arg-type]
        assert (await bus.stats()).head == first.seq == 1


async def test_text_that_sqlite_cannot_store_is_refused_before_the_commit(log_path: Path) -> None:
    async with Bus.open(log_path) as bus:
        for kwargs in ({"key": "k\ud800"}, {"idempotency_key": "\udfff"}):
            with pytest.raises(InvalidEvent, match="valid Unicode"):
                await bus.publish("t", 1, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(InvalidEvent, match="valid Unicode"):
            await bus.publish("t\ud800", 1)
        with pytest.raises(PayloadError):
            await bus.publish("t", 1, headers={"h": "\ud800"})
        await bus.publish("t", "ok")
    assert await logged_payload_count(log_path) == 1


async def test_a_cyclic_or_very_deep_payload_is_a_payload_error(log_path: Path) -> None:
    # Regression: both raised a raw RecursionError.
    cyclic: list[object] = []
    cyclic.append(cyclic)
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    async with Bus.open(log_path) as bus:
        for payload in (cyclic, deep, {"a": cyclic}):
            with pytest.raises(PayloadError, match="nested too deeply, or cyclic"):
                await bus.publish("t", payload)
            with pytest.raises(PayloadError):
                bus.publish_nowait("t", payload)
            with pytest.raises(PayloadError):
                await bus.publish_many([Message("t", 1), Message("t", payload)])
    assert await logged_payload_count(log_path) == 0


async def test_headers_that_are_not_a_dict_are_a_payload_error(log_path: Path) -> None:
    # Regression: headers="abc" raised a raw AttributeError.
    async with Bus.open(log_path) as bus:
        for headers in ("abc", [("a", "b")], 5):
            with pytest.raises(PayloadError, match="headers must be a dict"):
                await bus.publish("t", 1, headers=headers)  # type: ignore[arg-type]
        with pytest.raises(PayloadError, match="headers must be a dict"):
            bus.publish_nowait("t", 1, headers="abc")  # type: ignore[arg-type]
    assert await logged_payload_count(log_path) == 0


async def test_publish_many_refuses_an_item_that_is_not_a_message() -> None:
    async with Bus.open(":memory:") as bus:
        with pytest.raises(InvalidEvent, match="a Message"):
            await bus.publish_many([Message("t", 1), ("t", 2)])  # type: ignore[list-item]
        assert (await bus.stats()).head == 0


async def test_an_oversized_payload_is_refused_without_being_encoded_in_full() -> None:
    # Regression: a payload far over the limit was encoded in full first (2 GB: +1.9 GiB
    # of memory, 6 s). Here one 100 kB string repeated 1,000 times: 100 MB encoded,
    # 100 kB held.
    blob = "x" * 100_000
    payloads: list[object] = [[blob] * 1_000, {"a": [{"b": blob}] * 1_000}, "y" * 10**8]
    async with Bus.open(":memory:", config=BusConfig(max_event_bytes=1_000_000)) as bus:
        for payload in payloads:
            tracemalloc.start()
            try:
                with pytest.raises(EventTooLarge) as info:
                    await bus.publish("blobs", payload)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 8_000_000, f"{peak} bytes allocated to refuse the event"
            assert info.value.size > info.value.limit == 1_000_000
        # Just under the limit still goes through.
        await bus.publish("blobs", [blob] * 9)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
async def test_a_publish_in_a_forked_child_is_refused(tmp_path: Path) -> None:
    # The child of a fork has the parent's thread id and a copy of its running loop;
    # the log's connection and the writer are the parent's. Its publish on a loop of
    # its own must be refused as from another loop, as before the check got cheaper.
    async with Bus.open(tmp_path / "app.db") as bus:
        await bus.publish("t", 1)  # the fast check has seen this thread
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:  # the child: report what publish did, and leave at once
            outcome = b"published"
            try:
                asyncio.run(bus.publish("t", 2))
            except WrongEventLoop:
                outcome = b"refused"
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                outcome = type(exc).__name__.encode()
            os.write(write, outcome)
            os._exit(0)
        os.close(write)
        with anyio.fail_after(30):
            outcome = await anyio.to_thread.run_sync(os.read, read, 100)
            await anyio.to_thread.run_sync(os.waitpid, pid, 0)
        os.close(read)
        assert outcome == b"refused"
        assert (await bus.stats()).head == 1


async def test_a_publish_from_another_thread_or_loop_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    # A commit at once runs on the caller's thread: from another thread it would use
    # the log's connection beside the loop's, and the writer's queues are not
    # thread-safe. Refused up front, with what to do instead.
    async with Bus.open(tmp_path / "app.db") as bus:
        errors: list[BaseException] = []

        def elsewhere() -> None:
            async def on_another_loop() -> None:
                for attempt in (
                    bus.publish("t", 1),
                    bus.publish_many([Message("t", 2)]),
                ):
                    try:
                        await attempt
                    except WrongEventLoop as exc:
                        errors.append(exc)

            asyncio.run(on_another_loop())
            try:  # no loop at all in this thread
                bus.publish_nowait("t", 3)
            except WrongEventLoop as exc:
                errors.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        assert len(errors) == 3
        assert all(isinstance(e, RuntimeError) for e in errors)
        assert "run_coroutine_threadsafe" in str(errors[0])
        assert (await bus.stats()).head == 0
        # On its own loop, and handed over from another thread, it publishes.
        await bus.publish("t", 4)
        loop = asyncio.get_running_loop()
        handed = await anyio.to_thread.run_sync(
            lambda: asyncio.run_coroutine_threadsafe(bus.publish("t", 5), loop).result(10)
        )
        assert handed.seq == 2
