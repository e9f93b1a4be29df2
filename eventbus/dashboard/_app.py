"""The dashboard as one Starlette application: the overview, and the routes of every
page."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

import eventbus.storage as _storage

from .._errors import BusError
from ..workflows import WorkflowError
from ._base import Dashboard, root
from ._dead_pages import DeadLetterPages
from ._history import sparkline
from ._jobs import Jobs
from ._render import render
from ._run_pages import RunPages
from ._security import Guard, Token


class OverviewPage:
    """The overview of a :class:`Dashboard`, and its live region."""

    def __init__(self, d: Dashboard) -> None:
        self.d = d

    async def _overview_context(self) -> dict[str, object]:
        snap = await self.d.source.snapshot()
        self.d.history.record(snap)
        charts: dict[str, dict[str, str]] = {}
        rates: dict[str, float] = {}
        for s in snap.subscriptions:
            points = self.d.history.series(s.name)
            rates[s.name] = self.d.history.throughput(s.name)
            charts[s.name] = {
                "throughput": sparkline(
                    [p.throughput for p in points], label=f"{s.name}: events per second"
                ),
                "p99": sparkline(
                    [p.handler_p99 or 0.0 for p in points], label=f"{s.name}: handler p99"
                ),
            }
        return {"snap": snap, "charts": charts, "rates": rates}

    async def overview(self, request: Request) -> Response:
        context = await self._overview_context()
        return HTMLResponse(
            self.d.page(request, "overview.html", "overview", "Overview", **context)
        )

    async def fragment(self, request: Request) -> Response:
        context = await self._overview_context()
        return HTMLResponse(render("overview_body.html", root=root(request), **context))


async def _failed(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(
        f"503: the log could not be read or changed: {exc}. Try again; if it persists, check "
        "the file (eventbus stats FILE) and the bus's log.",
        status_code=503,
    )


async def _bad_request(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"400: {exc}", status_code=400)


async def _bad_run(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"404: {exc}", status_code=404)


def build(dashboard: Dashboard, token: Token, *, owns_source: bool) -> Starlette:
    """The Starlette application of ``dashboard``.

    Its lifespan (run when it is the server's app; a mounted app's is not) owns a task
    group where long changes run with a progress page, and closes the source when
    ``owns_source`` (a file it opened). Without it, changes run within their request.
    """
    d = dashboard
    overview, dead, runs = OverviewPage(d), DeadLetterPages(d), RunPages(d)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            async with anyio.create_task_group() as group:
                d.jobs = Jobs(group)
                try:
                    yield
                finally:
                    d.jobs = None
                    group.cancel_scope.cancel()  # a change cut short stays as far as it got
        finally:
            if owns_source:
                await d.source.close()

    routes = [
        Route("/", overview.overview),
        Route("/fragments/overview", overview.fragment),
        Route("/dead-letters", dead.dead_letters),
        Route("/dead-letters/confirm", dead.confirm, methods=["POST"]),
        Route("/dead-letters/apply", dead.apply, methods=["POST"]),
        Route("/dead-letters/{seq:int}", dead.dead_letter),
        Route("/jobs/{id}", dead.job),
        Route("/fragments/jobs/{id}", dead.job_fragment),
        Route("/workflows", runs.workflows),
        Route("/fragments/workflows", runs.workflows_fragment),
        Route("/fragments/workflows/{id:path}", runs.workflow_fragment),
        Route("/workflows/{id:path}/cancel", runs.cancel, methods=["POST"]),
        Route("/workflows/{id:path}", runs.workflow),
        Route("/reconcile", runs.reconcile_page),
        Route("/reconcile", runs.reconcile, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, token=token)],
        exception_handlers={
            ValueError: _bad_request,
            _storage.StorageError: _failed,
            WorkflowError: _bad_run,
            BusError: _failed,
        },
        lifespan=lifespan,
    )
