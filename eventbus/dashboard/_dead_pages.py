"""The dead-letter pages: the filtered list, one letter, and redrive or purge after a
confirmation that says how many letters it touches."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from .._log_access import Outcome
from ._base import Dashboard, queued, root
from ._filters import Filter, dead_cursor
from ._render import pretty, render
from ._source import Action

#: Dead letters per page.
PAGE = 50
#: An action on a filter with a time range names its letters one by one: at most
#: this many (narrow the range, or drop it, beyond).
MAX_BY_TIME = 10_000


class DeadLetterPages:
    """The dead-letter pages of a :class:`Dashboard`."""

    def __init__(self, d: Dashboard) -> None:
        self.d = d

    async def dead_letters(self, request: Request) -> Response:
        try:
            f = Filter.parse(request.query_params)
        except ValueError as exc:
            return PlainTextResponse(f"400: {exc}", status_code=400)
        reader = await self.d.source.reader()
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
            next_url = f"{root(request)}/dead-letters?{query}"
        return HTMLResponse(
            self.d.page(
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
        return sorted(await (await self.d.source.reader()).subscriptions())

    async def dead_letter(self, request: Request) -> Response:
        seq = int(request.path_params["seq"])
        subscription = request.query_params.get("subscription") or None
        reader = await self.d.source.reader()
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
            self.d.page(
                request,
                "dead_letter.html",
                "dead",
                f"Dead letter {seq}",
                d=d,
                payload=pretty(d.record.payload),
                headers=pretty(d.record.headers),
            )
        )

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
        form, pairs = await self.d.form(request)
        refused = self.d.refused(form, request)
        if refused is not None:
            return refused
        parsed = self._action(form)
        if parsed is None:
            return PlainTextResponse("400: no action (do=redrive:selected, ...)", status_code=400)
        action, scope = parsed
        f = Filter.parse(form)
        back = f"{root(request)}/dead-letters?{urlencode(list(f.fields()))}"
        if scope == "selected":
            picks = self._picks(pairs)
            count = len(picks)
            what = f"the {count} selected" if count else "none selected: tick some first"
            fields = [("pick", f"{i} {s}") for i, s in picks]
        else:
            reader = await self.d.source.reader()
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
            self.d.page(
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
        form, pairs = await self.d.form(request)
        refused = self.d.refused(form, request)
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
        back = f"{root(request)}/dead-letters?{urlencode(list(f.fields()))}"
        verb = "Re-injected" if action == "redrive" else "Purged"
        source = self.d.source

        async def work(progress: Callable[[int], None]) -> str:
            outcomes: list[Outcome] = []
            before = 0

            def moved(n: int) -> None:
                progress(before + n)

            if scope == "filter" and not f.by_time:
                outcomes.append(
                    await source.change_dead_letters(
                        action, f.subscription, None, f.error_type, moved
                    )
                )
            else:
                by_sub: dict[str, list[str]] = {}
                for event_id, subscription in picks:
                    by_sub.setdefault(subscription, []).append(event_id)
                for subscription, ids in by_sub.items():
                    outcome = await source.change_dead_letters(
                        action, subscription, ids, None, moved
                    )
                    outcomes.append(outcome)
                    before += outcome.count or 0
            return _said(outcomes, f"{verb.lower()} {{}} dead letters", action)

        if self.d.jobs is not None:
            total = len(picks) if picks else int(form.get("count", "0") or 0)
            job = self.d.jobs.start(f"{verb} dead letters", total, back, work)
            return RedirectResponse(f"{root(request)}/jobs/{job.id}", status_code=303)
        return HTMLResponse(
            self.d.page(
                request,
                "done.html",
                "dead",
                verb,
                heading=f"{verb} dead letters",
                message=await work(lambda n: None),
                back=back,
            )
        )

    async def job(self, request: Request) -> Response:
        """The page of a change running (or done) in the background."""
        job = None if self.d.jobs is None else self.d.jobs.get(request.path_params["id"])
        if job is None:
            return _no_job(request)
        return HTMLResponse(self.d.page(request, "job.html", "dead", job.what, job=job))

    async def job_fragment(self, request: Request) -> Response:
        job = None if self.d.jobs is None else self.d.jobs.get(request.path_params["id"])
        if job is None:
            return _no_job(request)
        return HTMLResponse(render("job_body.html", job=job))

    async def _named(self, f: Filter) -> list[tuple[str, str]]:
        reader = await self.d.source.reader()
        rows = await reader.dead_letters(
            f.subscription, MAX_BY_TIME, 0, error_type=f.error_type, since=f.since, until=f.until
        )
        return [(r.record.id, r.subscription) for r in rows]


def _no_job(request: Request) -> Response:
    return PlainTextResponse(
        f"404: no change {request.path_params['id']!r} here: the dashboard restarted, or it "
        "finished long ago; the dead letters page shows where things stand.",
        status_code=404,
    )


def _said(outcomes: list[Outcome], done: str, action: str) -> str:
    if any(o.queued for o in outcomes):
        return queued(action, next(o for o in outcomes if o.queued))
    n = sum(o.count or 0 for o in outcomes)
    return done.format(n).capitalize() + "."
