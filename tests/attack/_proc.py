"""Real worker processes, their output read line by line with deadlines."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

WORKER = Path(__file__).with_name("_kill_worker.py")
_EOF = object()


class Worker:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[object] = queue.Queue()
        self._stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, daemon=True),
            threading.Thread(target=self._pump_err, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(_EOF)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr[-60:])

    def next_line(self, timeout: float) -> str | None:
        """The next line of output; None at the end of it. Fails past `timeout`."""
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no output from the worker within {timeout}s; stderr:\n{self.stderr}"
            ) from None
        return None if item is _EOF else str(item)

    def wait_for(self, predicate: object, timeout: float) -> list[str]:
        """Read lines until `predicate(line)` holds; returns every line read."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            line = self.next_line(max(0.01, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(
                    f"worker ended (status {self.proc.wait()}) before the awaited line; "
                    f"last lines {seen[-5:]}; stderr:\n{self.stderr}"
                )
            seen.append(line)
            if predicate(line):  # type: ignore[operator]
                return seen

    def rest(self) -> list[str]:
        """Every line still to come, once the process has ended (or been killed)."""
        self.proc.wait(timeout=60)
        out: list[str] = []
        while (line := self.next_line(timeout=30)) is not None:
            out.append(line)
        return out

    def _close(self) -> None:
        for thread in self._threads:
            thread.join(timeout=30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._close()

    def finish(self, timeout: float) -> int:
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._close()
        return status
