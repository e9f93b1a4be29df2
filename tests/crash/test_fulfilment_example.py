"""The order-fulfilment example kills itself mid-run, resumes, and checks itself:
charges, emails and revenue exactly once, and a clean reconciliation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fulfilment.py"


@pytest.mark.slow
def test_the_fulfilment_example_survives_its_kill_and_reconciles_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--orders", "200", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "run 1: killed (SIGKILL)" in out
    assert "-- SIGKILL inside the charge step" in out
    assert "charged                 200 orders, once each" in out
    assert "OK: nothing lost" in out
    assert "OK: every order fulfilled exactly once" in out
