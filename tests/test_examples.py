"""The examples run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_quickstart_bills_and_mails_one_invoice() -> None:
    assert run_example("examples/quickstart.py").strip() == "invoice for o-1: 5"


def test_demo_accounts_for_every_event(tmp_path: Path) -> None:
    out = run_example("examples/demo.py", "--events", "3000", "--path", str(tmp_path / "d.db"))
    assert "OK: every event handled exactly once" in out
    assert "log head seq           3,000" in out


def test_the_users_tests_example_passes_under_pytest_with_the_kit() -> None:
    out = run_example("-m", "pytest", "examples/users_tests", "-q", "-p", "no:cacheprovider")
    assert "4 passed" in out
