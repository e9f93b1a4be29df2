"""The state behind the dashboard's pages, and what every page shares: rendering in
the layout, reading a form, refusing an action that is not allowed."""

from __future__ import annotations

import secrets
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .._log_access import Outcome
from ..reconcile import ReconcileReport
from ._history import History
from ._jobs import Jobs
from ._render import render
from ._security import csrf_ok
from ._source import Source


def root(request: Request) -> str:
    """The prefix the dashboard is mounted under ("" at the top)."""
    return str(request.scope.get("root_path", ""))


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
        #: Where long changes run, while a server's lifespan provides one.
        self.jobs: Jobs | None = None

    def page(
        self, request: Request, template: str, page: str, title: str, /, **context: object
    ) -> str:
        """The template ``template`` in the layout, as the navigation's ``page``."""
        return render(
            template,
            root=root(request),
            page=page,
            title=title,
            where=self.where,
            actions=self.actions,
            csrf=self.csrf,
            **context,
        )

    async def form(self, request: Request) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """A form POSTed (urlencoded): as a dict, and as pairs for repeated fields."""
        pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        return dict(pairs), pairs

    def refused(self, form: dict[str, str], request: Request) -> Response | None:
        """The 403 of an action this dashboard does not allow, or without its form
        token; None when the action may go ahead."""
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


def queued(action: str, outcome: Outcome) -> str:
    """What a page says of a change queued for the bus that owns the log."""
    return (
        f"Queued {action} for the bus that owns the log ({outcome.owner}): it applies it within "
        "a second (BusConfig.control_interval) and logs what it did; the pages show the change "
        "once it has."
    )
