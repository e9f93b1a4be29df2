"""Helpers the benchmark scripts share.

bench/ is scripts, not a package: run as ``python bench/<name>.py``, a script finds
this module because Python puts bench/ first on ``sys.path``; tests load the scripts
with :func:`load_script` after putting bench/ there too.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, overload

from eventbus.progress import Progress

T = TypeVar("T")

BENCH = Path(__file__).resolve().parent


def load_script(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` as ``bench_<name>`` (once: later calls return it)."""
    module_name = f"bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while built
    spec.loader.exec_module(module)
    return module


@overload
def median(values: Sequence[float]) -> float: ...
@overload
def median(values: Sequence[T], key: Callable[[T], float]) -> T: ...
def median(values: Sequence[Any], key: Callable[[Any], float] | None = None) -> Any:
    """The middle value (the upper one of an even count, so it is a value measured)."""
    return sorted(values, key=key)[len(values) // 2]


def loop_name() -> str:
    """The running event loop's kind: ``uvloop`` or ``asyncio (...)``."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "(no running loop)"
    if type(loop).__module__.split(".")[0] == "uvloop":
        return "uvloop"
    return f"asyncio ({type(loop).__name__})"


def machine(loop: str) -> str:
    """One line naming what the figures were measured on."""
    return (
        f"python {platform.python_version()} on {loop}, sqlite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.machine()}"
    )


class ThreadTimes:
    """The calling thread's time on a CPU and time spent ready to run but waiting for
    one (Linux ``/proc/thread-self/schedstat``; elsewhere the CPU time alone, and no
    wait). On a shared machine the wait says how much of a run's wall time other
    processes took from the event loop."""

    def __init__(self) -> None:
        self.cpu, self.wait = self._read()

    @staticmethod
    def _read() -> tuple[float, float | None]:
        try:
            with open("/proc/thread-self/schedstat") as f:
                on_cpu, waiting, _ = f.read().split()
        except (OSError, ValueError):
            return time.thread_time(), None
        return int(on_cpu) / 1e9, int(waiting) / 1e9

    def since(self) -> tuple[float, float | None]:
        """Seconds on a CPU, and seconds waiting for one (None: not known), since
        this object was made."""
        cpu, wait = self._read()
        return cpu - self.cpu, None if wait is None or self.wait is None else wait - self.wait


@contextmanager
def steps(label: str, total: int, *, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """What a script's ``progress=`` takes: each call counts one of ``total``
    measurement steps done and prints its message (``  .. message``) on stderr; on a
    terminal a progress line with an ETA stays below the messages
    (:mod:`eventbus.progress`). ``quiet`` (the scripts' ``--quiet``) prints neither."""
    with Progress(label, total, unit="steps", quiet=quiet) as progress:

        def say(message: str) -> None:
            progress.advance()
            progress.echo(f"  .. {message}")

        yield say


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """The scripts' ``--quiet``: no progress messages, no progress line."""
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress messages and no progress line"
    )


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Collect, then freeze what is alive (the harness's inputs) for one measurement,
    so the cyclic GC does not rescan pre-built inputs on the bus's account; objects
    allocated while the measurement runs are collected as usual."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def temp_dir(prefix: str = "eventbus-bench-") -> Iterator[str]:
    """A scratch directory, removed afterwards."""
    directory = tempfile.mkdtemp(prefix=prefix)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
