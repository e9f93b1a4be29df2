"""A handled event's state writes and its acknowledgement reach the log in the same
commit, even when the commit happens while the call goes on with later events."""

from __future__ import annotations

import anyio
import pytest

from eventbus import BatchPolicy, Bus, Context, Event, Message
from eventbus.storage import MemoryStorage, Receipt, WriteBatch

pytestmark = pytest.mark.anyio


class Recording(MemoryStorage):
    """Keeps what each commit acknowledged beside the state it wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[WriteBatch] = []

    async def commit(self, batch: WriteBatch) -> list[Receipt]:
        self.commits.append(batch)
        return await super().commit(batch)


async def test_state_never_commits_without_the_acknowledgement_of_its_event() -> None:
    log = Recording()
    gate = anyio.Event()
    first_written = anyio.Event()
    async with Bus.open(":memory:", storage=log) as bus:

        @bus.subscribe("t", name="s", batch=BatchPolicy(mode="fixed", max_size=2))
        async def handler(event: Event[str], ctx: Context) -> None:
            if event.payload == "writes":
                ctx.state.set("seen", event.seq)
                first_written.set()
            elif event.payload == "waits":
                await gate.wait()  # the call goes on while the writer commits

        # Two calls of two events: the first leaves its acknowledgement pending when
        # the second starts; the second's first event writes, its second waits.
        receipts = await bus.publish_many([Message("t", p) for p in ("a", "b", "writes", "waits")])
        with anyio.fail_after(10):
            await first_written.wait()
        await bus.publish("other", 0)  # a commit while the second event waits
        gate.set()
        await bus.drain(timeout=10)
    first = receipts[2].seq
    acked = 0
    done: set[int] = set()
    for batch in log.commits:
        acked = max(acked, batch.acks.get("s", 0))
        done.update(s for name, lo, hi in batch.done if name == "s" for s in range(lo, hi + 1))
        if any(name == "s" for name, _, _ in batch.state):
            assert acked >= first or first in done, "state committed ahead of its ack"
