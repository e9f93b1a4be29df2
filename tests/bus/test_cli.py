"""The command line reads a log file, also while a bus owns it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from eventbus import Bus, BusConfig, Context, Event, Message, RetryPolicy, progress
from eventbus import _log_access as log_access
from eventbus.cli import main
from tests.conftest import wait_until


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


def test_redrive_and_purge_work_directly_on_a_log_no_bus_owns(
    log_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(make_log, log_path)
    assert main(["dlq", "list", str(log_path), "--error-type", "KeyError"]) == 0
    assert "no dead letters" in capsys.readouterr().out
    assert main(["dlq", "redrive", str(log_path), "-s", "billing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"re-injected": 1}

    async def handled_after_redrive() -> list[int]:
        seen: list[int] = []
        async with Bus.open(log_path) as bus:

            @bus.subscribe("orders", name="billing")
            async def fixed(event: Event[int], ctx: Context) -> None:
                seen.append(event.payload)

            await bus.drain(timeout=10)
        return seen

    assert anyio.run(handled_after_redrive) == [3]
    assert main(["dlq", "purge", str(log_path), "--all"]) == 0
    assert "purged 0 dead letters" in capsys.readouterr().out


@pytest.mark.anyio
async def test_redrive_from_the_command_line_reaches_the_running_bus(log_path: Path) -> None:
    await make_log(log_path)
    seen: list[int] = []
    config = BusConfig(control_interval=0.05)
    async with Bus.open(log_path, config=config) as bus:

        @bus.subscribe("orders", name="billing")
        async def fixed(event: Event[int], ctx: Context) -> None:
            seen.append(event.payload)

        await bus.drain(timeout=10)
        result = await anyio.run_process(
            [sys.executable, "-m", "eventbus", "dlq", "redrive", str(log_path)], check=True
        )
        assert b"queued redrive" in result.stdout
        await wait_until(bus, lambda: seen == [3])
        assert await bus.dead_letters.list() == []


async def make_dead_letters(path: Path, n: int) -> None:
    async with Bus.open(path) as bus:

        @bus.subscribe("orders", name="billing", retry=RetryPolicy(max_attempts=1))
        async def bill(event: Event[int], ctx: Context) -> None:
            raise ValueError(f"order {event.payload} is cursed")

        await bus.publish_many(Message("orders", i, key=f"o-{i}") for i in range(n))
        await bus.drain(timeout=10)


def test_redrive_reinjects_every_letter_in_chunks_with_a_progress_line_on_a_terminal(
    log_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    anyio.run(make_dead_letters, log_path, 7)
    monkeypatch.setattr(log_access, "REDRIVE_CHUNK", 3)  # chunks of 3, 3 and 1
    monkeypatch.setattr(progress, "should_draw", lambda *_a, **_k: True)
    assert main(["dlq", "redrive", str(log_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "re-injected 7 dead letters\n"
    drawn = [part for part in captured.err.split("\r") if part.strip()]
    # Drawn after the first chunk, then at most every 0.1 s, and at the end.
    assert drawn[0].split()[1] == "3/7"
    assert drawn[-1].split()[1] == "7/7"
    assert "ETA 0:00" in drawn[-1]
    assert captured.err.endswith("\r")  # the line is cleared before the command's output
    assert main(["dlq", "list", str(log_path)]) == 0
    assert "no dead letters" in capsys.readouterr().out


def test_redrive_with_quiet_draws_nothing_even_on_a_terminal(
    log_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    anyio.run(make_dead_letters, log_path, 4)
    monkeypatch.setattr(log_access, "REDRIVE_CHUNK", 3)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert main(["dlq", "redrive", str(log_path), "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"re-injected": 4}
    assert captured.err == ""
