"""examples/pipeline.py stays exactly once when killed with SIGKILL and rerun."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipeline.py"


@pytest.mark.slow
def test_the_pipeline_example_is_exactly_once_across_kills(tmp_path: Path) -> None:
    rng = random.Random(11)
    cmd = [sys.executable, str(EXAMPLE), "--path", str(tmp_path / "p.db"), "--events", "3000"]
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(0.4, 1.2))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=30)
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "OK: exactly once" in final.stdout
    assert kills >= 1
