"""User reconcilers compare the bus with an outside system, publish corrections and
flag what they cannot correct; a failing one is reported and never stops the bus."""

from __future__ import annotations

import json

import anyio
import pytest

from eventbus import Bus, BusConfig, ConfigError, Context, Event, Reconciliation

pytestmark = pytest.mark.anyio

MANUAL = BusConfig(reconcile_interval=0)


async def test_a_reconciler_publishes_corrections_until_the_books_match() -> None:
    # The outside system of record: what each account should hold.
    ledger = {"a-1": 50, "a-2": 20, "a-3": 5}
    async with Bus.open(":memory:", config=MANUAL) as bus:

        @bus.subscribe("deposits", name="balances")
        async def apply(event: Event[int], ctx: Context) -> None:
            assert event.key is not None
            ctx.state.set(event.key, await ctx.state.get(event.key, 0) + event.payload)

        @bus.reconciler(every=3600, name="ledger")
        async def compare(rc: Reconciliation) -> None:
            balances = rc.bus.state("balances")
            for account, expected in ledger.items():
                held = await balances.get(account, 0)
                if held < expected:
                    await rc.publish(
                        "deposits",
                        expected - held,
                        key=account,
                        idempotency_key=f"fix:{account}:{held}->{expected}",
                    )
                elif held > expected:
                    rc.flag(f"{account} holds {held}, the ledger says {expected}")

        await bus.publish("deposits", 50, key="a-1")
        await bus.publish("deposits", 30, key="a-2")  # more than the ledger: flagged
        await bus.drain(timeout=10)

        report = await bus.reconcile()
        (result,) = report.reconcilers
        assert (result.name, result.runs, result.corrections) == ("ledger", 1, 1)
        assert result.flags == ("a-2 holds 30, the ledger says 20",)
        assert result.error is None
        assert report.flags == ("ledger: a-2 holds 30, the ledger says 20",)
        assert report.ok  # a flag is about the outside system, not a lost event
        await bus.drain(timeout=10)
        assert await bus.state("balances").get("a-3") == 5

        again = await bus.reconcile()
        (result,) = again.reconcilers
        assert (result.runs, result.corrections, result.total_corrections) == (2, 0, 1)
        assert "ledger: every 3600s, 2 runs, latest 0 corrections, 1 flags, ok" in str(again)
        data = json.loads(json.dumps(again.to_dict()))
        assert data["reconcilers"][0]["flags"] == ["a-2 holds 30, the ledger says 20"]
        metrics = bus.metrics().reconcile
        assert metrics is not None
        assert (metrics.flags, metrics.reconciler_errors) == (1, 0)


async def test_reconcilers_run_on_their_own_period() -> None:
    runs: list[float] = []
    enough = anyio.Event()
    async with Bus.open(":memory:", config=MANUAL) as bus:

        @bus.reconciler(every=0.02)
        async def tick(rc: Reconciliation) -> None:
            runs.append(anyio.current_time())
            if len(runs) == 3:
                enough.set()

        with anyio.fail_after(10):
            await enough.wait()
    assert runs == sorted(runs)


async def test_a_failing_reconciler_is_reported_and_the_bus_goes_on() -> None:
    failed = anyio.Event()
    config = BusConfig(reconcile_interval=0, reconcile_lease=0.05)
    async with Bus.open(":memory:", config=config) as bus:

        @bus.reconciler(every=0.01, name="broken")
        async def broken(rc: Reconciliation) -> None:
            failed.set()
            raise RuntimeError("the outside system is down")

        @bus.reconciler(every=3600, name="slow")
        async def slow(rc: Reconciliation) -> None:
            await anyio.sleep_forever()

        with anyio.fail_after(10):
            await failed.wait()
        await bus.publish("orders", 1)  # still serving

        # A run longer than the lease is cancelled and reported too.
        report = await bus.reconcile()
        errors = {r.name: r.error for r in report.reconcilers}
        assert errors == {
            "broken": "RuntimeError: the outside system is down",
            "slow": "TimeoutError: ran longer than the reconcile lease (0.05s)",
        }
        assert "error RuntimeError: the outside system is down" in report.format()
        metrics = bus.metrics().reconcile
        assert metrics is not None
        assert metrics.reconciler_errors == 2


async def test_reconciler_arguments_are_checked() -> None:
    async with Bus.open(":memory:", config=MANUAL) as bus:

        async def check(rc: Reconciliation) -> None:
            pass

        with pytest.raises(ValueError, match="every must be"):
            bus.reconciler(every=0)(check)
        bus.reconciler(every=1, name="one")(check)
        with pytest.raises(ValueError, match="already exists"):
            bus.reconciler(every=1, name="one")(check)


def test_reconcile_settings_load_like_the_others() -> None:
    config = BusConfig.from_dict({"reconcile_interval": 0, "reconcile_lease": 30})
    assert (config.reconcile_interval, config.reconcile_lease) == (0, 30)
    env = BusConfig.from_env({"EVENTBUS_RECONCILE_LEASE": "12.5"})
    assert env.reconcile_lease == 12.5
    assert BusConfig().reconcile_interval == 60.0
    with pytest.raises(ConfigError) as info:
        BusConfig(reconcile_lease=0)
    assert info.value.key == "reconcile_lease"
    with pytest.raises(ConfigError) as info:
        BusConfig.from_dict({"reconcile_interval": -1})
    assert info.value.key == "reconcile_interval"
    with pytest.raises(ConfigError) as info:
        BusConfig.from_dict({"reconcile_every": 5})
    assert info.value.key == "reconcile_every"
