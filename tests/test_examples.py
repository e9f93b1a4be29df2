"""The examples run as a user would run them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import anyio

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


def test_the_handler_testing_example_passes_and_fails_as_it_says() -> None:
    # examples/test_handlers.py is a pytest module for users to copy; run its tests
    # here as pytest would (testpaths does not collect examples/).
    spec = importlib.util.spec_from_file_location(
        "example_tests", ROOT / "examples/test_handlers.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        anyio.run(test)


def test_the_users_tests_example_passes_under_pytest_with_the_kit() -> None:
    out = run_example("-m", "pytest", "examples/users_tests", "-q", "-p", "no:cacheprovider")
    assert "4 passed" in out
