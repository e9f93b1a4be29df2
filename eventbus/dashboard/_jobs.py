"""Changes that outlast a request (a redrive of thousands of dead letters from a log
file), run in a task group the server's lifespan owns, with a page that shows their
progress while they run."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

from anyio.abc import TaskGroup

import eventbus.storage as _storage

from .._errors import BusError
from .._logging import get_logger

logger = get_logger("dashboard")

#: Finished jobs remembered (for their pages); the oldest are forgotten first.
KEEP = 20

Work = Callable[[Callable[[int], None]], Awaitable[str]]


class Job:
    """One change running or done: ``done`` of ``total`` so far, then its ``message``."""

    def __init__(self, job_id: str, what: str, total: int, back: str) -> None:
        self.id = job_id
        self.what = what
        self.total = total
        self.back = back
        self.done = 0
        self.message: str | None = None
        self.failed = False

    def progress(self, done: int) -> None:
        self.done = done


class Jobs:
    """The jobs of one dashboard, each a task of ``group``."""

    def __init__(self, group: TaskGroup) -> None:
        self._group = group
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)

    def start(self, what: str, total: int, back: str, work: Work) -> Job:
        """Run ``work(progress)``, whose result is the message the job's page ends with."""
        job = Job(str(next(self._ids)), what, total, back)
        self._jobs[job.id] = job
        finished = [j for j in self._jobs.values() if j.message is not None]
        for old in finished[: max(0, len(finished) - KEEP)]:
            del self._jobs[old.id]
        self._group.start_soon(self._run, job, work)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    @staticmethod
    async def _run(job: Job, work: Work) -> None:
        try:
            job.message = await work(job.progress)
        except (_storage.StorageError, BusError) as exc:
            logger.error("dashboard: %s failed: %s", job.what, exc)
            job.failed = True
            job.message = (
                f"{job.what} stopped after {job.done} of {job.total}: {exc}. What was done "
                "stays done; running it again takes up the rest."
            )
