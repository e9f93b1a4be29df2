"""The chaos harness, in a small configuration: real subprocesses killed with SIGKILL
at random (seeded) moments, restarted, and the books checked: at concurrency 1 with
kills while the worker also publishes, and at concurrency 16 with everything published
first, so every kill lands on consumers working through a backlog. And a check of its
checks: a subscription that does not keep key order fails them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from eventbus.chaos import (
    Kill,
    Settings,
    _Blame,
    _charged_in_an_instant,
    _read_calls,
    expected_settled,
    format_report,
    run_harness,
    settled,
)
from eventbus.progress import Progress
from tests.test_progress import Terminal

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("concurrency", "publish_first"),
    [
        pytest.param(1, False, id="concurrency-1-killed-while-publishing"),
        pytest.param(16, True, id="concurrency-16-published-first-then-killed"),
    ],
)
def test_a_two_stage_pipeline_is_exactly_once_and_in_key_order_across_kills(
    tmp_path: Path, concurrency: int, publish_first: bool
) -> None:
    settings = Settings(
        events=6000,
        kills=4,
        seed=3,
        concurrency=concurrency,
        publish_first=publish_first,
        poison_every=100,
        flaky_every=250,
        min_wait=0.1,
        max_wait=0.9,
    )
    report = run_harness(tmp_path, settings)
    text = format_report(report, seed=settings.seed)
    assert report.ok, text
    assert report.kills == 4, text
    assert report.order_violations == 0, text
    assert report.blamed_outside_calls == 0, text
    assert report.poison_dead_letters == 60, text


def test_the_order_checks_catch_a_subscription_that_lets_a_key_run_out_of_order(
    tmp_path: Path,
) -> None:
    settings = Settings(
        events=3000, kills=0, concurrency=16, ordered=False, poison_every=0, flaky_every=0
    )
    report = run_harness(tmp_path, settings)
    text = format_report(report, seed=settings.seed)
    assert not report.ok, text
    assert report.order_violations > 0, text


def test_on_a_terminal_the_harness_shows_the_orders_settled_and_the_kills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    settings = Settings(events=6000, kills=2, seed=5, poison_every=100, min_wait=0.1, max_wait=0.5)
    screen = Terminal()
    total = expected_settled(settings)
    assert total == 5940
    progress = Progress("chaos", total, unit="settled", stream=screen, enabled=True)
    report = run_harness(tmp_path, settings, progress)
    text = format_report(report, seed=settings.seed)
    assert report.ok, text
    assert report.kills == 2, text
    # The last count is the sink's, read after the last run.
    assert progress.done == settled(tmp_path)
    assert 5940 - report.killed_thrice <= progress.done <= 5940
    last = screen.getvalue().rsplit("\r", 1)[1]
    assert last.startswith(f"chaos  {progress.done:,}/5,940 settled")
    assert last.rstrip().endswith("run 3, 2/2 kills")


@pytest.mark.postgres
def test_consumer_processes_sharing_a_postgres_log_are_exactly_once_across_kills(
    tmp_path: Path, pg_url: str
) -> None:
    """Three consumer processes and a publisher on one PostgreSQL log; one consumer
    at a time killed and started again: the others take its partitions over."""
    settings = Settings(
        events=10000,
        kills=4,
        seed=5,
        io_ms=1.0,  # enough work that the consumers are still busy at the last kill
        poison_every=250,
        flaky_every=500,
        min_wait=0.1,
        max_wait=0.8,
        backend="postgres",
        processes=3,
        url=pg_url + "&lease=2",
    )
    report = run_harness(tmp_path, settings)
    text = format_report(report, seed=settings.seed)
    assert report.ok, text
    assert report.kills == 4, text
    assert report.poison_dead_letters == report.dead_letters == 40, text


def test_consumer_processes_sharing_a_sqlite_log_are_exactly_once_across_kills(
    tmp_path: Path,
) -> None:
    """A publisher and two consumer processes on one SQLite file opened with
    ``shared=True`` (one dispatches at a time); one consumer at a time killed and
    started again: the other takes the dispatching over."""
    settings = Settings(
        events=6000,
        kills=6,
        seed=3,
        concurrency=4,
        io_ms=0.5,
        poison_every=100,
        flaky_every=250,
        min_wait=0.1,
        max_wait=0.8,
        processes=2,
        shared=True,
    )
    report = run_harness(tmp_path, settings)
    text = format_report(report, seed=settings.seed)
    assert report.ok, text
    assert report.kills == 6, text
    assert report.poison_dead_letters == report.dead_letters == 60, text


def test_on_a_shared_log_a_kill_after_a_calls_last_line_may_charge_that_call(
    tmp_path: Path,
) -> None:
    """Regression: killed after the handler's last line of a call (its third attempt)
    but before the bus ended the call's row, the next dispatcher rightly charged a
    death and dead-lettered the event as ProcessDied; the books called it blamed
    outside a running call."""
    (tmp_path / "calls-1.txt").write_text(
        "start enrich 7 1 1.0\nend enrich 7 1.1\n"
        "start enrich 7 2 2.0\nend enrich 7 2.1\n"
        "start enrich 7 3 3.0\nend enrich 7 3.1\n",
        encoding="utf-8",
    )
    running, window, _ = _read_calls(tmp_path / "calls-1.txt")
    assert (running, window) == ({}, {"enrich": [7]})
    kill = Kill(1, running, running, window)
    blame = _Blame(Counter(), {"enrich 7"})
    _charged_in_an_instant(blame, tmp_path, 1, [kill])
    assert blame.blamed - set(blame.deaths) - set(blame.possible) == set()
    assert blame.in_an_instant == 1
    assert blame.beyond_one_call == 0


def test_on_a_shared_log_a_batch_charged_in_an_instant_is_one_call(tmp_path: Path) -> None:
    """Regression: a batch of settle (five events) killed after its handler's last
    line counted as five calls in an instant, and so did a batch caught before its
    first line (whose events, charged together, run again one at a time); with four
    kills the books called clean PostgreSQL runs journaled beyond one call. A batch
    is one call, and a call the row-lingers rule covers (ended just before the kill)
    is not counted again."""
    (tmp_path / "calls-1.txt").write_text(
        "start settle 1,2,3,4,5 1,1,1,1,1 1.0\nend settle 1,2,3,4,5 1.1\n",
        encoding="utf-8",
    )
    (tmp_path / "calls-2.txt").write_text(
        "start settle 1,2,3,4,5 2,2,2,2,2 2.0\nend settle 1,2,3,4,5 2.1\n"
        "start settle 6 2 2.2\nend settle 6 2.3\nstart settle 7 2 2.4\nend settle 7 2.5\n"
        "start settle 8 2 2.6\nend settle 8 2.7\n"
        "start enrich 9 1 2.8\nend enrich 9 2.9\n",
        encoding="utf-8",
    )
    first = Kill(1, {}, {}, _read_calls(tmp_path / "calls-1.txt")[1], at=1.5)
    second = Kill(2, {}, {}, {"enrich": [9]}, ended={"enrich": [9]}, at=2.95)
    blamed = {f"settle {n}" for n in range(1, 9)} | {"enrich 9"}
    blame = _Blame(Counter(), blamed)
    blame.possible.update(["enrich 9"])  # ended within the lingering of its row
    _charged_in_an_instant(blame, tmp_path, 2, [first, second])
    assert blame.blamed - set(blame.deaths) - set(blame.possible) == set()
    assert blame.in_an_instant == 2  # the ended batch 1-5, the batch 6-8 before its start
    assert blame.possible["enrich 9"] == 1
    assert blame.beyond_one_call == 0

    # Four enrich calls (of several partitions) caught at one kill are one instant.
    (tmp_path / "calls-3.txt").write_text(
        "".join(f"start enrich {n} 2 3.{n}\nend enrich {n} 3.{n}5\n" for n in range(10, 14))
        + "start settle 20 2 4.5\nend settle 20 4.6\n",
        encoding="utf-8",
    )
    third = Kill(3, {}, {}, {}, at=3.0)
    blame = _Blame(Counter(), {f"enrich {n}" for n in range(10, 14)})
    _charged_in_an_instant(blame, tmp_path, 3, [first, second, third])
    assert (blame.in_an_instant, blame.beyond_one_call) == (1, 0)
    # One kill, three instants (enrich and settle caught before their first lines, and
    # a batch after its last): more than one a subscription.
    fourth = Kill(4, {}, {}, {"settle": [1, 2, 3, 4, 5]}, at=3.0)
    blame = _Blame(Counter(), {f"enrich {n}" for n in range(10, 14)} | {"settle 20", "settle 1"})
    _charged_in_an_instant(blame, tmp_path, 3, [fourth])
    assert (blame.in_an_instant, blame.beyond_one_call) == (3, 1)


def test_on_a_shared_log_an_event_charged_in_two_instants_counts_two_deaths(
    tmp_path: Path,
) -> None:
    """An event caught before its first line at one kill, then ended as the next
    victim's last line and charged again: two deaths that no kill found running, both
    possible (else its dead letter after a third death would look unexpected)."""
    (tmp_path / "calls-2.txt").write_text(
        "start settle 5 2 2.0\nend settle 5 2.1\n", encoding="utf-8"
    )
    (tmp_path / "calls-3.txt").write_text(
        "start settle 5 3 3.0\nend settle 5 3.1\n", encoding="utf-8"
    )
    first = Kill(1, {}, {}, {}, at=1.0)
    second = Kill(2, {}, {}, {"settle": [5]}, at=2.5)
    blame = _Blame(Counter(), {"settle 5"})
    _charged_in_an_instant(blame, tmp_path, 3, [first, second])
    assert blame.possible["settle 5"] == 2
    assert (blame.in_an_instant, blame.beyond_one_call) == (2, 0)
