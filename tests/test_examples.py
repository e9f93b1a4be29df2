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
    assert "5 passed" in out


def test_a_users_handler_that_fails_fails_their_test_with_its_own_exception(
    tmp_path: Path,
) -> None:
    """A project of the user's own (no pytest configuration but the kit's one line in
    conftest.py) whose test does not expect the failure: pytest reports the test
    failed with the handler's exception and its traceback in the handler's code."""
    for name in ("conftest.py", "billing.py"):
        (tmp_path / name).write_text((ROOT / "examples/users_tests" / name).read_text())
    (tmp_path / "test_refund.py").write_text(
        "from billing import Order, Payments, register\n"
        "\n"
        "\n"
        "async def test_a_free_order_is_billed(bus):\n"
        "    register(bus, Payments())\n"
        "    await bus.publish('orders', Order('o-9', 0), key='o-9')\n"
        "    await bus.drain()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out  # 1: tests ran and one failed
    assert "1 failed" in out, out
    assert "ValueError: order" in out, out
    assert "has no amount to charge" in out, out
    assert "billing.py" in out, out  # the traceback reaches the handler's own line
    assert "dead-lettered" in out, out  # the note says what the bus did with the event
