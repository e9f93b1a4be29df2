"""The progress line: what it draws, and when it stays silent."""

from __future__ import annotations

import io

import pytest

from eventbus.progress import Progress, format_duration, render, should_draw


class Terminal(io.StringIO):
    """A stream that says it is a terminal (or not)."""

    def __init__(self, tty: bool = True) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def no_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)


# -- rendering ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (7.4, "0:07"), (59.6, "1:00"), (125, "2:05"), (3725, "1:02:05"), (-3, "0:00")],
)
def test_durations_read_as_minutes_and_seconds_then_hours(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_line_shows_count_share_elapsed_and_the_eta_at_the_average_rate() -> None:
    line = render("redrive", 1200, 5000, 12.0, unit="letters", note="billing")
    # 1,200 in 12 s: 100/s, so 3,800 more take 38 s.
    assert line == "redrive  1,200/5,000 letters   24%  0:12 elapsed  ETA 0:38  billing"


def test_the_eta_is_unknown_until_something_is_done_and_zero_once_all_is() -> None:
    assert render("chaos", 0, 50, 3.0).endswith("ETA ?")
    assert "ETA 0:00" in render("chaos", 50, 50, 80.0)
    assert " 100%" in render("chaos", 60, 50, 80.0)  # more done than expected: capped


def test_without_a_total_the_line_counts_and_times_but_gives_no_eta() -> None:
    line = render("bench", 7, None, 65.0, unit="runs")
    assert line == "bench  7 runs  1:05 elapsed"


def test_the_line_never_reaches_the_terminal_edge_so_it_does_not_wrap() -> None:
    line = render("chaos", 1, 50, 1.0, note="x" * 200, width=40)
    assert len(line) == 39
    assert line.endswith("...")


# -- silence rules ------------------------------------------------------------------


def test_it_draws_only_when_stderr_and_stdout_are_terminals(no_ci: None) -> None:
    assert should_draw(Terminal(), stdout=Terminal())
    assert not should_draw(Terminal(tty=False), stdout=Terminal())
    assert not should_draw(Terminal(), stdout=Terminal(tty=False))


@pytest.mark.parametrize("value", ["true", "1", "yes", "GitHub"])
def test_it_is_silent_under_ci(value: str) -> None:
    assert not should_draw(Terminal(), environ={"CI": value}, stdout=Terminal())


@pytest.mark.parametrize("value", ["", "0", "false", "FALSE"])
def test_a_ci_variable_that_says_no_does_not_silence_it(value: str) -> None:
    assert should_draw(Terminal(), environ={"CI": value}, stdout=Terminal())


def test_quiet_silences_it_on_a_terminal(no_ci: None) -> None:
    assert not should_draw(Terminal(), quiet=True, stdout=Terminal())


def test_a_closed_or_plain_stream_is_not_a_terminal(no_ci: None) -> None:
    closed = io.StringIO()
    closed.close()
    assert not should_draw(closed, stdout=Terminal())
    assert not should_draw(io.StringIO(), stdout=Terminal())


def test_a_progress_follows_the_rules_for_its_own_stream(no_ci: None) -> None:
    assert not Progress("x", 10, stream=Terminal(tty=False)).enabled
    assert not Progress("x", 10, stream=Terminal(), quiet=True).enabled


def test_a_silent_progress_writes_nothing_but_its_echoed_lines() -> None:
    out = Terminal(tty=False)
    with Progress("bench", 3, stream=out) as progress:
        assert not progress.enabled
        progress.advance()
        progress.echo("  .. round 1")
        progress.advance(2)
    assert out.getvalue() == "  .. round 1\n"


def test_quiet_echoes_nothing_either() -> None:
    out = Terminal()
    with Progress("bench", 3, stream=out, quiet=True) as progress:
        progress.advance()
        progress.echo("  .. round 1")
    assert out.getvalue() == ""


# -- drawing ------------------------------------------------------------------------


def test_the_line_is_redrawn_in_place_and_cleared_at_the_end() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress("chaos", 4, unit="kills", stream=out, enabled=True, clock=clock)
    clock.now += 10
    progress.advance()
    first = "chaos  1/4 kills   25%  0:10 elapsed  ETA 0:30"
    assert out.getvalue() == "\r" + first
    clock.now += 10
    progress.advance(note="run 3")
    second = "chaos  2/4 kills   50%  0:20 elapsed  ETA 0:20  run 3"
    assert out.getvalue() == "\r" + first + "\r" + second
    progress.close()
    assert out.getvalue().endswith("\r" + " " * len(second) + "\r")


def test_redraws_are_spaced_by_the_interval_except_the_last() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress("x", 100, stream=out, enabled=True, clock=clock, interval=1.0)
    for _ in range(50):
        clock.now += 0.01
        progress.advance()
    assert out.getvalue().count("\r") == 1  # the first draw; the rest came too soon
    progress.update(100)  # done: drawn at once
    assert out.getvalue().count("\r") == 2
    assert "100/100" in out.getvalue()


def test_a_shorter_line_covers_what_is_left_of_the_longer_one() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress("x", 10, stream=out, enabled=True, clock=clock, interval=0)
    progress.update(1, note="a long note here")
    progress.update(2, note="")
    last = out.getvalue().rsplit("\r", 1)[1]
    assert last.startswith("x  2/10")
    assert last.endswith(" " * len(" a long note here"))


def test_an_echoed_line_goes_above_the_progress_line() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress("x", 10, stream=out, enabled=True, clock=clock, interval=0)
    progress.update(1)
    drawn = out.getvalue()
    progress.echo("  .. round 1")
    after = out.getvalue()[len(drawn) :]
    width = len(drawn) - 1
    # Cleared, the text on a line of its own, and the progress line again below it.
    assert after.startswith("\r" + " " * width + "\r  .. round 1\n\rx  1/10")


def test_tick_moves_the_elapsed_time_without_counting() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress("x", None, stream=out, enabled=True, clock=clock, interval=0)
    progress.tick()
    clock.now += 61
    progress.tick()
    assert out.getvalue().endswith("x  0  1:01 elapsed")
