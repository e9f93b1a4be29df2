"""An event that kills the process is dead-lettered after max_attempts deaths, and
everything else is handled: no crash loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from eventbus import Bus

WORKER = Path(__file__).with_name("_poison_worker.py")


@pytest.mark.slow
def test_a_process_killing_event_is_dead_lettered_after_max_attempts_deaths(
    tmp_path: Path, log_url: str
) -> None:
    log = log_url
    handled = tmp_path / "handled.txt"
    codes = []
    for _ in range(6):
        result = subprocess.run(
            [sys.executable, str(WORKER), log, str(handled)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        codes.append(result.returncode)
        if result.returncode == 0:
            break
        assert result.returncode == 13, result.stderr
    # Three attempts, three deaths; the fourth run dead-letters it and finishes.
    assert codes == [13, 13, 13, 0]
    seen = [int(x) for x in handled.read_text().split()]
    assert set(seen) == set(range(20)) - {7}

    async def inspect() -> None:
        async with Bus.open(log) as bus:
            (dead,) = await bus.dead_letters.list("sink")
            assert dead.event.payload == 7
            assert dead.attempts == 3
            assert "process died while handling" in dead.error_message
            stats = await bus.stats()
            assert stats.lag == {"sink": 0}
            assert stats.retries == {}

    anyio.run(inspect)
