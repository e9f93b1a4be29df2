"""The workflow pages (runs by status, one run's steps, cancel) and the
reconciliation page."""

from __future__ import annotations

from typing import cast
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from ._base import Dashboard, queued, root
from ._filters import STATUSES, workflow_status
from ._render import render

#: Workflow runs per page.
PAGE = 50


class RunPages:
    """The workflow and reconciliation pages of a :class:`Dashboard`."""

    def __init__(self, d: Dashboard) -> None:
        self.d = d

    async def _runs_context(self, request: Request) -> dict[str, object]:
        status = workflow_status(request.query_params.get("status"))
        name = request.query_params.get("name") or None
        after = int(request.query_params.get("after", "0") or 0)
        reader = await self.d.source.reader()
        runs = await reader.workflows(name=name, status=status, after=after, limit=PAGE + 1)
        prefix = root(request)
        query = [(k, v) for k, v in (("status", status), ("name", name)) if v]
        next_url = None
        if len(runs) > PAGE:
            next_url = f"{prefix}/workflows?{urlencode([*query, ('after', runs[PAGE - 1].num)])}"
        return {
            "runs": runs[:PAGE],
            "status": status,
            "name": name,
            "next_url": next_url,
            "live_url": f"{prefix}/fragments/workflows?{urlencode([*query, ('after', after)])}",
        }

    async def workflows(self, request: Request) -> Response:
        context = await self._runs_context(request)
        reader = await self.d.source.reader()
        name = cast("str | None", context["name"])
        counts = {"all": await reader.count_workflows(name=name)}
        for s in STATUSES:
            counts[s] = await reader.count_workflows(name=name, status=s)
        return HTMLResponse(
            self.d.page(
                request,
                "workflows.html",
                "workflows",
                "Workflows",
                statuses=STATUSES,
                counts=counts,
                **context,
            )
        )

    async def workflows_fragment(self, request: Request) -> Response:
        context = await self._runs_context(request)
        return HTMLResponse(render("workflows_body.html", root=root(request), **context))

    async def _run_context(self, request: Request) -> dict[str, object] | None:
        reader = await self.d.source.reader()
        run = await reader.workflow(request.path_params["id"])
        if run is None:
            return None
        return {"run": run, "steps": await reader.steps(run.id)}

    async def workflow(self, request: Request) -> Response:
        context = await self._run_context(request)
        if context is None:
            return _no_run(request)
        return HTMLResponse(
            self.d.page(request, "workflow.html", "workflows", "Workflow run", **context)
        )

    async def workflow_fragment(self, request: Request) -> Response:
        context = await self._run_context(request)
        if context is None:
            return _no_run(request)
        return HTMLResponse(render("workflow_body.html", **context))

    async def cancel(self, request: Request) -> Response:
        form, _ = await self.d.form(request)
        refused = self.d.refused(form, request)
        if refused is not None:
            return refused
        workflow_id = request.path_params["id"]
        outcome = await self.d.source.cancel(workflow_id)
        prefix = root(request)
        if outcome.queued:
            message = queued("cancel", outcome)
        elif outcome.count:
            message = f"Cancelled run {workflow_id}."
        else:
            message = f"Run {workflow_id} was not running: left as it is."
        return HTMLResponse(
            self.d.page(
                request,
                "done.html",
                "workflows",
                "Cancel",
                heading="Cancel a workflow run",
                message=message,
                back=f"{prefix}/workflows/{quote(workflow_id, safe='')}",
            )
        )

    # -- reconciliation -----------------------------------------------------------

    async def reconcile_page(self, request: Request) -> Response:
        periodic = self.d.source.periodic()
        return HTMLResponse(
            self.d.page(
                request,
                "reconcile.html",
                "reconcile",
                "Reconciliation",
                report=self.d.report,
                periodic=periodic,
                live=self.d.source.live,
            )
        )

    async def reconcile(self, request: Request) -> Response:
        form, _ = await self.d.form(request)
        refused = self.d.refused(form, request)
        if refused is not None:
            return refused
        self.d.report = await self.d.source.reconcile()
        return await self.reconcile_page(request)


def _no_run(request: Request) -> Response:
    return PlainTextResponse(
        f"404: no workflow run with id {request.path_params['id']!r} in this log (never "
        "started, or finished and compacted); the workflows page lists those there are.",
        status_code=404,
    )
