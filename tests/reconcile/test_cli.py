"""``eventbus reconcile FILE`` accounts for every event from the file alone, and exits 1
when any is lost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, Event, RetryPolicy
from eventbus.cli import main
from tests.reconcile.test_lost import punch_hole

MANUAL = BusConfig(reconcile_interval=0)


async def make_log(path: Path) -> None:
    async with Bus.open(path, config=MANUAL) as bus:

        @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=1))
        async def bill(event: Event[int], ctx: Context) -> None:
            if event.payload == 3:
                raise ValueError("amount 3 is cursed")

        @bus.subscribe(["orders", "refunds"], name="audit")
        async def audit(event: Event[int], ctx: Context) -> None:
            pass

        for i in range(8):
            await bus.publish("orders", i, key=f"o-{i}")
            await bus.publish("refunds", i)
        await bus.drain(timeout=10)


def test_a_clean_file_exits_0_and_a_deleted_ack_exits_1(
    log_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(make_log, log_path)
    assert main(["reconcile", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert "OK: nothing lost" in out
    assert "from the file alone" in out

    assert main(["reconcile", str(log_path), "--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["ok"] is True
    billing = next(s for s in clean["subscriptions"] if s["name"] == "billing")
    assert (billing["dead"], billing["lost"], billing["cursor"]) == (1, 0, 16)

    # Seqs 5..9 lose their acknowledgement for billing (orders are the odd seqs).
    punch_hole(log_path, "billing", 5, 9)
    assert main(["reconcile", str(log_path), "--json"]) == 1
    lost = json.loads(capsys.readouterr().out)
    assert lost["ok"] is False
    assert lost["totals"]["lost"] == 2  # seq 7 is the dead letter: accounted for
    billing = next(s for s in lost["subscriptions"] if s["name"] == "billing")
    assert billing["lost_seqs"] == [5, 9]
    assert main(["reconcile", str(log_path)]) == 1
    out = capsys.readouterr().out
    assert "billing: 2 lost (seq 5, 9); not repaired: a bus where it is subscribed" in out


@pytest.mark.anyio
async def test_the_command_runs_as_a_module_and_a_repairing_bus_makes_the_file_clean(
    log_path: Path,
) -> None:
    await make_log(log_path)
    punch_hole(log_path, "audit", 3, 6)
    command = [sys.executable, "-m", "eventbus", "reconcile", str(log_path)]
    result = await anyio.run_process(command, check=False)
    assert result.returncode == 1, result.stderr
    assert b"LOST 4 events" in result.stdout

    seen: list[int] = []
    async with Bus.open(log_path, config=MANUAL) as bus:

        @bus.subscribe(["orders", "refunds"], name="audit")
        async def audit(event: Event[int], ctx: Context) -> None:
            seen.append(event.seq)

        await bus.drain(timeout=10)
        assert (await bus.reconcile()).repaired.lost == 4
        await bus.drain(timeout=10)
        # Also while a bus runs on the file: the command only reads.
        result = await anyio.run_process(command, check=False)
        assert result.returncode == 0, result.stdout
    assert sorted(seen) == [3, 4, 5, 6]
    result = await anyio.run_process(command, check=False)
    assert result.returncode == 0, result.stdout
