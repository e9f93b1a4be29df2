"""drain() on a log shared by several buses waits for the events the others
committed before it was called, not only for this bus's own: a consumer that never
published drains what a publisher elsewhere put in the log (regression: its target
was its own writer's head, 0, so it returned at once)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, Event, Message
from eventbus.storage import is_postgres_url

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite-shared", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url")) + "&lease=2"
    return str(tmp_path / "shared.db")


def _config(url: str) -> BusConfig:
    return BusConfig(breaker=None, shared=not is_postgres_url(url))


async def test_a_consumer_drains_what_another_bus_published_before_the_call(
    shared_url: str,
) -> None:
    gate = anyio.Event()
    handled: list[int] = []
    async with Bus.open(shared_url, config=_config(shared_url)) as consumer:

        @consumer.subscribe("orders", name="count")
        async def count(event: Event[int], ctx: Context) -> None:
            await gate.wait()
            handled.append(event.payload)

        async with Bus.open(shared_url, config=_config(shared_url)) as publisher:
            await publisher.publish_many(Message("orders", i, key=f"k{i % 3}") for i in range(5))
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.drain, 30)
            gate.set()
        assert sorted(handled) == list(range(5))
