"""The dashboard's pages and actions, as one Starlette application."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import parse_qsl, quote, urlencode

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

import eventbus.storage as _storage

from .._errors import BusError
from .._log_access import Outcome
from ..reconcile import ReconcileReport
from ..workflows import WorkflowError
from ._filters import STATUSES, Filter, dead_cursor, workflow_status
from ._history import History, sparkline
from ._render import pretty, render
from ._security import Guard, Token, csrf_ok
from ._source import Action, Source

#: Dead letters per page, and workflow runs per page.
PAGE = 50
#: An action on a filter with a time range names its letters one by one: at most
#: this many (narrow the range, or drop it, beyond).
MAX_BY_TIME = 10_000


class Dashboard:
    """The state behind the pages: where they read, what they may do, what they
    remember (the overview's recent past, the last reconciliation report)."""

    def __init__(self, source: Source, *, where: str, allow_actions: bool) -> None:
        self.source = source
        self.where = where
        self.actions = allow_actions
        self.csrf = secrets.token_urlsafe(32)
        self.history = History()
        self.report: ReconcileReport | None = None

    def page(
        self, request: Request, template: str, page: str, title: str, /, **context: object
    ) -> str:
        return render(
            template,
            root=request.scope.get("root_path", ""),
            page=page,
            title=title,
            where=self.where,
            actions=self.actions,
            csrf=self.csrf,
            **context,
        )

    # -- overview ---------------------------------------------------------------

    async def _overview_context(self) -> dict[str, object]:
        snap = await self.source.snapshot()
        self.history.record(snap)
        charts: dict[str, dict[str, str]] = {}
        rates: dict[str, float] = {}
        for s in snap.subscriptions:
            points = self.history.series(s.name)
            rates[s.name] = self.history.throughput(s.name)
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
        return HTMLResponse(self.page(request, "overview.html", "overview", "Overview", **context))

    async def overview_fragment(self, request: Request) -> Response:
        context = await self._overview_context()
        return HTMLResponse(
            render("overview_body.html", root=request.scope.get("root_path", ""), **context)
        )

    # -- dead letters -----------------------------------------------------------

    async def dead_letters(self, request: Request) -> Response:
        try:
            f = Filter.parse(request.query_params)
        except ValueError as exc:
            return PlainTextResponse(f"400: {exc}", status_code=400)
        reader = await self.source.reader()
        after_seq, after_sub = dead_cursor(request.query_params.get("after"))
        rows = await reader.dead_letters(
            f.subscription,
            PAGE + 1,
            after_seq,
            error_type=f.error_type,
            since=f.since,
            until=f.until,
            after_subscription=after_sub,
        )
        total = await reader.count_dead_letters(
            f.subscription, error_type=f.error_type, since=f.since, until=f.until
        )
        stats_subs = await self._subscription_names()
        next_url = None
        if len(rows) > PAGE:
            last, following = rows[PAGE - 1], rows[PAGE]
            cursor = str(last.record.seq)
            if following.record.seq == last.record.seq:
                cursor += f":{last.subscription}"
            query = urlencode([*f.fields(), ("after", cursor)])
            next_url = f"{request.scope.get('root_path', '')}/dead-letters?{query}"
        return HTMLResponse(
            self.page(
                request,
                "dead_letters.html",
                "dead",
                "Dead letters",
                f=f,
                rows=rows[:PAGE],
                total=total,
                subscriptions=stats_subs,
                next_url=next_url,
            )
        )

    async def _subscription_names(self) -> list[str]:
        return sorted(await (await self.source.reader()).subscriptions())

    async def dead_letter(self, request: Request) -> Response:
        seq = int(request.path_params["seq"])
        subscription = request.query_params.get("subscription") or None
        reader = await self.source.reader()
        rows = [
            r for r in await reader.dead_letters(subscription, 50, seq - 1) if r.record.seq == seq
        ]
        if not rows:
            return PlainTextResponse(
                f"404: no dead letter of event {seq}"
                + (f" for subscription {subscription!r}" if subscription else "")
                + ": it was redriven or purged meanwhile, or the address is wrong; the dead "
                "letters page lists those there are.",
                status_code=404,
            )
        d = rows[0]
        return HTMLResponse(
            self.page(
                request,
                "dead_letter.html",
                "dead",
                f"Dead letter {seq}",
                d=d,
                payload=pretty(d.record.payload),
                headers=pretty(d.record.headers),
            )
        )

    async def _form(self, request: Request) -> tuple[dict[str, str], list[tuple[str, str]]]:
        pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        return dict(pairs), pairs

    def _refused(self, form: dict[str, str], request: Request) -> Response | None:
        if not self.actions:
            return PlainTextResponse(
                "403: this dashboard is read-only. Start it with `eventbus serve FILE "
                "--allow-actions` (or app(bus, allow_actions=True)) to redrive, purge, cancel "
                "or reconcile from it.",
                status_code=403,
            )
        if not csrf_ok(self.csrf, form, request):
            return PlainTextResponse(
                "403: this action does not carry the dashboard's form token (a form from "
                "another site, or from before the dashboard restarted): reload the page and "
                "try again.",
                status_code=403,
            )
        return None

    @staticmethod
    def _picks(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The selected letters, as (event id, subscription)."""
        picks = []
        for key, value in pairs:
            if key == "pick" and " " in value:
                event_id, _, subscription = value.partition(" ")
                picks.append((event_id, subscription))
        return picks

    @staticmethod
    def _action(form: dict[str, str]) -> tuple[Action, str] | None:
        action, _, scope = form.get("do", "").partition(":")
        if action not in ("redrive", "purge") or scope not in ("selected", "filter"):
            return None
        return cast(Action, action), scope

    async def confirm(self, request: Request) -> Response:
        form, pairs = await self._form(request)
        refused = self._refused(form, request)
        if refused is not None:
            return refused
        parsed = self._action(form)
        if parsed is None:
            return PlainTextResponse("400: no action (do=redrive:selected, ...)", status_code=400)
        action, scope = parsed
        f = Filter.parse(form)
        back = f"{request.scope.get('root_path', '')}/dead-letters?{urlencode(list(f.fields()))}"
        if scope == "selected":
            picks = self._picks(pairs)
            count = len(picks)
            what = f"the {count} selected" if count else "none selected: tick some first"
            fields = [("pick", f"{i} {s}") for i, s in picks]
        else:
            reader = await self.source.reader()
            count = await reader.count_dead_letters(
                f.subscription, error_type=f.error_type, since=f.since, until=f.until
            )
            what = f.describe()
            if f.by_time and count > MAX_BY_TIME:
                what += (
                    f"; with a time range at most {MAX_BY_TIME} are named one by one: narrow the "
                    "range or clear it"
                )
                count = 0
            fields = list(f.fields())
        return HTMLResponse(
            self.page(
                request,
                "confirm.html",
                "dead",
                "Confirm",
                action=action,
                do=form["do"],
                count=count,
                scope=what,
                fields=fields,
                back=back,
            )
        )

    async def apply(self, request: Request) -> Response:
        form, pairs = await self._form(request)
        refused = self._refused(form, request)
        if refused is not None:
            return refused
        parsed = self._action(form)
        if parsed is None:
            return PlainTextResponse("400: no action (do=redrive:selected, ...)", status_code=400)
        action, scope = parsed
        f = Filter.parse(form)
        if scope == "selected":
            picks = self._picks(pairs)
        elif f.by_time:
            picks = await self._named(f)
        else:
            picks = []
        outcomes: list[Outcome] = []
        if scope == "filter" and not f.by_time:
            outcomes.append(
                await self.source.change_dead_letters(action, f.subscription, None, f.error_type)
            )
        else:
            by_sub: dict[str, list[str]] = {}
            for event_id, subscription in picks:
                by_sub.setdefault(subscription, []).append(event_id)
            for subscription, ids in by_sub.items():
                outcomes.append(
                    await self.source.change_dead_letters(action, subscription, ids, None)
                )
        back = f"{request.scope.get('root_path', '')}/dead-letters?{urlencode(list(f.fields()))}"
        verb = "Re-injected" if action == "redrive" else "Purged"
        return HTMLResponse(
            self.page(
                request,
                "done.html",
                "dead",
                verb,
                heading=f"{verb} dead letters" if action == "redrive" else "Purged dead letters",
                message=_said(outcomes, f"{verb.lower()} {{}} dead letters", action),
                back=back,
            )
        )

    async def _named(self, f: Filter) -> list[tuple[str, str]]:
        reader = await self.source.reader()
        rows = await reader.dead_letters(
            f.subscription, MAX_BY_TIME, 0, error_type=f.error_type, since=f.since, until=f.until
        )
        return [(r.record.id, r.subscription) for r in rows]

    # -- workflows ----------------------------------------------------------------

    async def _runs_context(self, request: Request) -> dict[str, object]:
        status = workflow_status(request.query_params.get("status"))
        name = request.query_params.get("name") or None
        after = int(request.query_params.get("after", "0") or 0)
        reader = await self.source.reader()
        runs = await reader.workflows(name=name, status=status, after=after, limit=PAGE + 1)
        root = request.scope.get("root_path", "")
        query = [(k, v) for k, v in (("status", status), ("name", name)) if v]
        next_url = None
        if len(runs) > PAGE:
            next_url = f"{root}/workflows?{urlencode([*query, ('after', runs[PAGE - 1].num)])}"
        return {
            "runs": runs[:PAGE],
            "status": status,
            "name": name,
            "next_url": next_url,
            "live_url": f"{root}/fragments/workflows?{urlencode([*query, ('after', after)])}",
        }

    async def workflows(self, request: Request) -> Response:
        context = await self._runs_context(request)
        reader = await self.source.reader()
        name = cast("str | None", context["name"])
        counts = {"all": await reader.count_workflows(name=name)}
        for s in STATUSES:
            counts[s] = await reader.count_workflows(name=name, status=s)
        return HTMLResponse(
            self.page(
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
        return HTMLResponse(
            render("workflows_body.html", root=request.scope.get("root_path", ""), **context)
        )

    async def _run_context(self, request: Request) -> dict[str, object] | None:
        reader = await self.source.reader()
        run = await reader.workflow(request.path_params["id"])
        if run is None:
            return None
        return {"run": run, "steps": await reader.steps(run.id)}

    async def workflow(self, request: Request) -> Response:
        context = await self._run_context(request)
        if context is None:
            return _no_run(request)
        return HTMLResponse(
            self.page(request, "workflow.html", "workflows", "Workflow run", **context)
        )

    async def workflow_fragment(self, request: Request) -> Response:
        context = await self._run_context(request)
        if context is None:
            return _no_run(request)
        return HTMLResponse(render("workflow_body.html", **context))

    async def cancel(self, request: Request) -> Response:
        form, _ = await self._form(request)
        refused = self._refused(form, request)
        if refused is not None:
            return refused
        workflow_id = request.path_params["id"]
        outcome = await self.source.cancel(workflow_id)
        root = request.scope.get("root_path", "")
        if outcome.queued:
            message = _queued("cancel", outcome)
        elif outcome.count:
            message = f"Cancelled run {workflow_id}."
        else:
            message = f"Run {workflow_id} was not running: left as it is."
        return HTMLResponse(
            self.page(
                request,
                "done.html",
                "workflows",
                "Cancel",
                heading="Cancel a workflow run",
                message=message,
                back=f"{root}/workflows/{quote(workflow_id, safe='')}",
            )
        )

    # -- reconciliation -----------------------------------------------------------

    async def reconcile_page(self, request: Request) -> Response:
        periodic = self.source.periodic()
        return HTMLResponse(
            self.page(
                request,
                "reconcile.html",
                "reconcile",
                "Reconciliation",
                report=self.report,
                periodic=periodic,
                live=self.source.live,
            )
        )

    async def reconcile(self, request: Request) -> Response:
        form, _ = await self._form(request)
        refused = self._refused(form, request)
        if refused is not None:
            return refused
        self.report = await self.source.reconcile()
        return await self.reconcile_page(request)


def _queued(action: str, outcome: Outcome) -> str:
    return (
        f"Queued {action} for the bus that owns the log ({outcome.owner}): it applies it within "
        "a second (BusConfig.control_interval) and logs what it did; the pages show the change "
        "once it has."
    )


def _said(outcomes: list[Outcome], done: str, action: str) -> str:
    if any(o.queued for o in outcomes):
        return _queued(action, next(o for o in outcomes if o.queued))
    n = sum(o.count or 0 for o in outcomes)
    return done.format(n).capitalize() + "."


def _no_run(request: Request) -> Response:
    return PlainTextResponse(
        f"404: no workflow run with id {request.path_params['id']!r} in this log (never "
        "started, or finished and compacted); the workflows page lists those there are.",
        status_code=404,
    )


async def _failed(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(
        f"503: the log could not be read or changed: {exc}. Try again; if it persists, check "
        "the file (eventbus stats FILE) and the bus's log.",
        status_code=503,
    )


async def _bad_run(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"404: {exc}", status_code=404)


def build(dashboard: Dashboard, token: Token, *, owns_source: bool) -> Starlette:
    """The Starlette application of ``dashboard``; ``owns_source``: its lifespan closes
    the source (a file it opened), which only runs when it is the server's app."""
    d = dashboard

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owns_source:
                await d.source.close()

    routes = [
        Route("/", d.overview),
        Route("/fragments/overview", d.overview_fragment),
        Route("/dead-letters", d.dead_letters),
        Route("/dead-letters/confirm", d.confirm, methods=["POST"]),
        Route("/dead-letters/apply", d.apply, methods=["POST"]),
        Route("/dead-letters/{seq:int}", d.dead_letter),
        Route("/workflows", d.workflows),
        Route("/fragments/workflows", d.workflows_fragment),
        Route("/fragments/workflows/{id:path}", d.workflow_fragment),
        Route("/workflows/{id:path}/cancel", d.cancel, methods=["POST"]),
        Route("/workflows/{id:path}", d.workflow),
        Route("/reconcile", d.reconcile_page),
        Route("/reconcile", d.reconcile, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, token=token)],
        exception_handlers={
            _storage.StorageError: _failed,
            WorkflowError: _bad_run,
            BusError: _failed,
        },
        lifespan=lifespan,
    )
