"""examples/windows.py, killed with SIGKILL at random moments and rerun, publishes
every window's total exactly once: checked from the log against a group-by of the
input events it holds."""

from __future__ import annotations

import importlib.util
import random
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from eventbus import Bus, Context, Event

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "windows.py"
EVENTS = 60_000


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_windows", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def read_back(path: Path) -> None:
    example = load_example()
    async with Bus.open(path) as bus:
        minutes = example.register(bus)
        inputs: list[dict[str, int]] = []
        input_keys: dict[int, str] = {}
        outputs: list[dict[str, Any]] = []

        # New subscriptions start at the oldest event: they read the whole log.
        @bus.subscribe("payments", name="check-input")
        async def read_input(events: list[Event[dict[str, int]]], ctx: Context) -> None:
            for event in events:
                inputs.append(event.payload)
                input_keys[event.payload["n"]] = event.key or ""

        @bus.subscribe("minute-totals", name="check-output")
        async def read_output(events: list[Event[dict[str, Any]]], ctx: Context) -> None:
            outputs.extend(e.payload for e in events)

        await bus.drain(timeout=60)
        still_open = {(w.key, w.start): w.value async for w in minutes.open_windows()}
        late = await minutes.late_count()
        dead = await bus.dead_letters.list()

    assert sorted(p["n"] for p in inputs) == list(range(EVENTS))  # each published once
    expected: dict[tuple[str, int], int] = defaultdict(int)
    top: dict[str, int] = {}
    for p in inputs:
        key = input_keys[p["n"]]
        expected[key, p["ts"] // example.MINUTE * example.MINUTE] += p["amount"]
        top[key] = max(p["ts"], top.get(key, p["ts"]))

    emitted = Counter((str(p["key"]), p["start"]) for p in outputs)
    assert [w for w, n in emitted.items() if n > 1] == [], "a window was published twice"
    closed = {(str(p["key"]), p["start"]): p["value"] for p in outputs}
    assert not closed.keys() & still_open.keys(), "a window is both published and open"
    assert {**closed, **still_open} == expected  # none missing, every total right
    for key, start in closed:  # closed exactly when the key's watermark passed the end
        assert start + example.MINUTE <= top[key] - example.LATENESS
    for key, start in still_open:
        assert start + example.MINUTE > top[key] - example.LATENESS
    assert late == 0
    assert dead == []


@pytest.mark.slow
def test_the_windows_example_publishes_each_window_once_across_kills(tmp_path: Path) -> None:
    rng = random.Random(23)
    path = tmp_path / "windows.db"
    cmd = [sys.executable, str(EXAMPLE), str(path), "--events", str(EVENTS)]
    kills = 0
    round_ = 0
    # Until four runs were killed (a run that finishes before its kill counts for
    # nothing: on a fast machine many do), at most 12.
    while kills < 4 and round_ < 12:
        round_ += 1
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        if round_ % 2:
            # While it publishes (or starts up): a rerun must publish the rest once.
            delay = rng.uniform(0.1, 0.8)
        else:
            # While the operator works through the payments.
            proc.stdout.readline()  # "published ..."
            delay = rng.uniform(0.0, 0.3)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=30)
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "OK: every minute exact, none twice" in final.stdout
    assert kills >= 3
    anyio.run(read_back, path)
