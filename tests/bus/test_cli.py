"""The command line reads a log file, also while a bus owns it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, Context, Event, RetryPolicy
from eventbus._cli import main


async def make_log(path: Path) -> None:
    async with Bus.open(path) as bus:

        @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=1))
        async def bill(event: Event[int], ctx: Context) -> None:
            if event.payload == 3:
                raise ValueError("amount 3 is cursed")

        for i in range(5):
            await bus.publish("orders", i, key=f"o-{i}")
        await bus.publish("other", 0)
        await bus.drain(timeout=10)


@pytest.mark.anyio
async def test_stats_show_head_cursor_and_lag(log_path: Path) -> None:
    await make_log(log_path)
    result = await anyio.run_process(
        [sys.executable, "-m", "eventbus", "stats", str(log_path), "--json"], check=True
    )
    stats = json.loads(result.stdout)
    assert stats["head"] == 6
    assert stats["lag"] == {"billing": 0}
    assert stats["dead_letters"] == {"billing": 1}


def test_dlq_list_and_show(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    anyio.run(make_log, log_path)
    assert main(["dlq", "list", str(log_path), "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["payload"] == 3
    assert item["error_message"] == "amount 3 is cursed"
    assert main(["dlq", "show", str(log_path), str(item["seq"])]) == 0
    shown = capsys.readouterr().out
    assert "amount 3 is cursed" in shown
    assert "Traceback" in shown
    assert main(["dlq", "show", str(log_path), "nope"]) == 1


def test_a_missing_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", str(tmp_path / "missing.db")]) == 2
    assert "no log at" in capsys.readouterr().err
