"""A one-line progress display with an ETA for long commands, redrawn in place.

Used by ``python -m eventbus.chaos``, ``eventbus dlq redrive`` and the benchmark
scripts. It needs nothing beyond the standard library: on a terminal the line is
drawn on stderr and redrawn with a carriage return (no escape codes), at most every
``interval`` seconds; anything else sees nothing. It is silent, and costs nothing
but a counter, when:

- stderr or stdout is not a terminal (output piped, redirected or captured),
- the ``CI`` environment variable is set (to anything but ``""``, ``"0"`` or
  ``"false"``),
- or the command was given ``--quiet`` (``quiet=True``).

    with Progress("redrive", total=n, unit="letters") as progress:
        for chunk in chunks:
            ...
            progress.advance(len(chunk))

The ETA assumes the rest goes at the average rate so far.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "format_duration", "render", "should_draw"]

#: Values of ``CI`` that do not count as running under CI.
_NOT_CI = ("", "0", "false", "no")


def should_draw(
    stream: TextIO,
    *,
    quiet: bool = False,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
) -> bool:
    """Whether a progress line may be drawn on ``stream``: not ``quiet``, not under
    CI, and both ``stream`` and stdout are terminals.

    Args:
        stream: Where the line would go (stderr by default in :class:`Progress`).
        quiet: The command's ``--quiet``.
        environ: The environment to read ``CI`` from; ``os.environ`` by default.
        stdout: The command's standard output; ``sys.stdout`` by default.
    """
    if quiet:
        return False
    env = os.environ if environ is None else environ
    if env.get("CI", "").strip().lower() not in _NOT_CI:
        return False
    return _is_terminal(stream) and _is_terminal(sys.stdout if stdout is None else stdout)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``7`` as ``"0:07"``, ``125`` as ``"2:05"``, ``3725`` as ``"1:02:05"``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def render(
    label: str,
    done: int,
    total: int | None,
    elapsed: float,
    *,
    unit: str = "",
    note: str = "",
    width: int = 80,
) -> str:
    """The progress line, at most ``width - 1`` characters (a line as wide as the
    terminal would wrap, and a carriage return could no longer redraw it).

    ``"redrive  1,200/5,000 letters  24%  0:12 elapsed  ETA 0:38  note"``; without a
    ``total``, the count and the elapsed time alone. The ETA is ``?`` until
    something is done.

    Args:
        label: What runs.
        done: How much is done.
        total: How much there is; None when not known.
        elapsed: Seconds since the start.
        unit: What is counted, after the numbers.
        note: Free text at the end (what runs now).
        width: The terminal's width in columns.
    """
    counted = f"{done:,}" if total is None else f"{done:,}/{total:,}"
    parts = [label, f"{counted} {unit}".rstrip()]
    if total is not None:
        share = min(1.0, done / total) if total > 0 else 1.0
        parts.append(f"{share:4.0%}")
    parts.append(f"{format_duration(elapsed)} elapsed")
    if total is not None:
        if done >= total:
            parts.append("ETA 0:00")
        elif done > 0 and elapsed > 0:
            parts.append(f"ETA {format_duration((total - done) * elapsed / done)}")
        else:
            parts.append("ETA ?")
    if note:
        parts.append(note)
    line = "  ".join(parts)
    limit = max(1, width - 1)
    if len(line) > limit:
        line = line[: limit - 3] + "..." if limit > 3 else line[:limit]
    return line


class Progress:
    """A progress line on stderr, redrawn in place while a long command runs.

    Silent (see :func:`should_draw`) when output is not a terminal, under CI, or
    with ``quiet``; :meth:`echo` still prints its lines then, unless ``quiet``.

    Args:
        label: What runs (``"chaos"``, ``"redrive"``).
        total: How much there is to do; None when not known (no ETA then).
        unit: What is counted (``"events"``).
        quiet: The command's ``--quiet``: nothing drawn, nothing echoed.
        stream: Where to draw; ``sys.stderr`` by default.
        enabled: Force drawing on or off, whatever :func:`should_draw` says.
        clock: Seconds, for the elapsed time and the ETA; ``time.monotonic``.
        interval: Least seconds between two redraws.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "",
        quiet: bool = False,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.note = ""
        self.quiet = quiet
        self._stream = sys.stderr if stream is None else stream
        self.enabled = should_draw(self._stream, quiet=quiet) if enabled is None else enabled
        self._clock = clock
        self._interval = interval
        self._started = clock()
        self._drawn_at: float | None = None
        self._shown = 0  # characters of the line on screen now

    def update(self, done: int, *, note: str | None = None) -> None:
        """Set how much is done (and, given, the note); redraw if due."""
        self.done = done
        if note is not None:
            self.note = note
        self._draw(force=self.total is not None and done >= self.total)

    def advance(self, n: int = 1, *, note: str | None = None) -> None:
        """Count ``n`` more done; redraw if due."""
        self.update(self.done + n, note=note)

    def tick(self) -> None:
        """Redraw if due, so the elapsed time moves while nothing is counted."""
        self._draw(force=False)

    def echo(self, text: str) -> None:
        """Print ``text`` as a line of its own above the progress line (on stderr,
        also when the line is not drawn), unless ``quiet``."""
        if self.quiet:
            return
        self._clear()
        self._stream.write(text + "\n")
        self._stream.flush()
        if self._drawn_at is not None:
            self._draw(force=True)

    def close(self) -> None:
        """Take the line off the screen (the command's own output follows)."""
        self._clear()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _draw(self, *, force: bool) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if not force and self._drawn_at is not None and now - self._drawn_at < self._interval:
            return
        width = shutil.get_terminal_size(fallback=(80, 24)).columns
        line = render(
            self.label,
            self.done,
            self.total,
            now - self._started,
            unit=self.unit,
            note=self.note,
            width=width,
        )
        # Spaces over what is left of a longer previous line.
        self._stream.write("\r" + line + " " * max(0, self._shown - len(line)))
        self._stream.flush()
        self._shown = len(line)
        self._drawn_at = now

    def _clear(self) -> None:
        if self._shown:
            self._stream.write("\r" + " " * self._shown + "\r")
            self._stream.flush()
            self._shown = 0
