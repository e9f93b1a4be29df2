"""The dashboard's pages and actions over HTTP, in process: a log no bus owns (changes
applied directly), paging on a long list, filters, addresses that name nothing, and a
dashboard mounted under a prefix with a token callable."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlencode

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import eventbus.dashboard as dashboard
from eventbus import Bus
from eventbus import _log_access as log_access
from eventbus.dashboard._history import History, sparkline
from eventbus.dashboard._jobs import Jobs
from eventbus.dashboard._source import Snapshot, SubscriptionView
from eventbus.storage import StorageError

from ._running import Shop, orders

pytestmark = pytest.mark.anyio
FORM = "application/x-www-form-urlencoded"


@contextlib.asynccontextmanager
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of ``app``, with its lifespan run around it as a server runs it
    (the dashboard of a file closes the file when it ends)."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dash") as c,
    ):
        yield c


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no form token on the page"
    return found.group(1)


async def finished(c: httpx.AsyncClient, response: httpx.Response) -> str:
    """The page of a change started in the background, once it has finished."""
    assert response.status_code == 303
    url = response.headers["location"]
    assert re.fullmatch(r"/jobs/\d+", url)
    with anyio.fail_after(10):
        while True:  # the page, until the job is done
            page = (await c.get(url)).text
            if 'id="outcome"' in page:
                return page
            await anyio.sleep(0.01)


async def make_log(path: Path, *, bad: int = 60, held: bool = True) -> None:
    """A log no bus owns any more: ``bad`` dead letters of billing, a completed run,
    and (``held``) a run left running."""
    shop = Shop(breaker=False)
    shop.hold.add(2)
    async with Bus.open(str(path)) as bus:
        await shop.install(bus)
        await orders(bus, range(1, 6))
        await orders(bus, range(1000, 1000 + bad), bad=True)
        handle = await bus.start_workflow("fulfil", {"id": 1}, workflow_id="run-1")
        await handle.result(timeout=10)
        if held:
            await bus.start_workflow("fulfil", {"id": 2}, workflow_id="run-2")


@pytest.fixture
async def log(tmp_path: Path) -> Path:
    path = tmp_path / "shop.db"
    await make_log(path)
    return path


async def test_every_page_answers_on_a_log_no_bus_owns(log: Path) -> None:
    async with client(dashboard.file_app(str(log), allow_actions=True)) as c:
        for path in (
            "/",
            "/fragments/overview",
            "/dead-letters",
            "/workflows",
            "/workflows?status=completed",
            "/fragments/workflows",
            "/workflows/run-1",
            "/fragments/workflows/run-1",
            "/reconcile",
        ):
            response = await c.get(path)
            assert response.status_code == 200, path
        page = (await c.get("/")).text
        assert "Read from the log file" in page
        assert re.search(r'data-subscription="billing".*?class="num dead"><a[^>]*>60<', page, re.S)


async def test_the_list_pages_on_and_its_filters_narrow_it(log: Path) -> None:
    async with client(dashboard.file_app(str(log))) as c:
        first = (await c.get("/dead-letters?subscription=billing")).text
        assert "<strong>60</strong> dead letters match; showing 50" in first
        found = re.search(r'href="(/dead-letters\?[^"]*after=\d+)"', first)
        assert found
        second = (await c.get(found.group(1).replace("&amp;", "&"))).text
        assert "showing 10" in second
        assert 'id="next-page"' not in second
        seqs = re.findall(r'data-seq="(\d+)"', first) + re.findall(r'data-seq="(\d+)"', second)
        assert len(set(seqs)) == 60

        none = (await c.get("/dead-letters?error_type=KeyError")).text
        assert "no dead letters match" in none
        later = time.time() + 3600
        future = (await c.get(f"/dead-letters?since={later}")).text
        assert "<strong>0</strong> dead letters match" in future
        past = (await c.get("/dead-letters?until=2100-01-01T00:00")).text
        assert "<strong>60</strong>" in past
        bad = await c.get("/dead-letters?since=yesterday")
        assert bad.status_code == 400
        assert "2026-11-27T03:00" in bad.text


async def test_addresses_that_name_nothing_say_so(log: Path) -> None:
    async with client(dashboard.file_app(str(log))) as c:
        letter = await c.get("/dead-letters/3?subscription=billing")
        assert letter.status_code == 404
        assert "redriven or purged" in letter.text
        run = await c.get("/workflows/no-such-run")
        assert run.status_code == 404
        assert "no workflow run with id 'no-such-run'" in run.text
        assert (await c.get("/fragments/workflows/no-such-run")).status_code == 404


async def test_actions_on_a_log_no_bus_owns_apply_directly(log: Path) -> None:
    async with client(dashboard.file_app(str(log), allow_actions=True)) as c:
        page = (await c.get("/dead-letters?subscription=billing")).text
        token = csrf(page)
        picks = re.findall(r'name="pick" value="([^"]+)"', page)[:3]

        nothing = await c.post("/dead-letters/confirm", data={"csrf": token, "do": "redrive:x"})
        assert nothing.status_code == 400
        bad_time = {"csrf": token, "do": "purge:filter", "since": "soon"}
        refused = await c.post("/dead-letters/confirm", data=bad_time)
        assert refused.status_code == 400
        assert "'soon' is neither" in refused.text
        assert (await c.get("/workflows?after=x")).status_code == 400
        empty = await c.post("/dead-letters/confirm", data={"csrf": token, "do": "purge:selected"})
        assert "none selected" in empty.text
        assert 'id="confirm"' not in empty.text

        data: list[tuple[str, str]] = [("csrf", token), ("do", "redrive:selected")]
        data += [("pick", p) for p in picks]
        form = {"content": urlencode(data), "headers": {"content-type": FORM}}
        confirm = await c.post("/dead-letters/confirm", **form)
        assert 'confirm-count">3<' in confirm.text
        done = await finished(c, await c.post("/dead-letters/apply", **form))
        assert "Re-injected 3 dead letters." in done

        # A filter with a time range names its letters one by one.
        ranged = {"csrf": token, "do": "purge:filter", "subscription": "billing"}
        ranged["until"] = "2100-01-01T00:00"
        confirm = await c.post("/dead-letters/confirm", data=ranged)
        assert 'confirm-count">57<' in confirm.text
        assert "last failed before 2100-01-01T00:00:00 UTC" in confirm.text
        done = await finished(c, await c.post("/dead-letters/apply", data=ranged))
        assert "Purged 57 dead letters." in done

        cancel = await c.post("/workflows/run-2/cancel", data={"csrf": token})
        assert "Cancelled run run-2." in cancel.text
        again = await c.post("/workflows/run-2/cancel", data={"csrf": token})
        assert "was not running" in again.text
        run = (await c.get("/workflows/run-2")).text
        assert re.search(r'id="run-status"[^>]*>cancelled<', run)

        report = await c.post("/reconcile", data={"csrf": token})
        assert "OK: nothing lost" in report.text


async def test_a_long_redrive_shows_its_progress(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_access, "REDRIVE_CHUNK", 7)  # 60 letters: 9 transactions
    seen: list[int] = []
    app = dashboard.file_app(str(log), allow_actions=True)
    async with client(app) as c:
        token = csrf((await c.get("/dead-letters")).text)
        data = {"csrf": token, "do": "redrive:filter", "subscription": "billing", "count": "60"}
        response = await c.post("/dead-letters/apply", data=data)
        url = response.headers["location"]
        with anyio.fail_after(30):
            while 'id="outcome"' not in (page := (await c.get(url)).text):
                found = re.search(r"(\d+) of 60 so far", page)
                assert found, page
                seen.append(int(found.group(1)))
                fragment = (await c.get(url.replace("/jobs/", "/fragments/jobs/"))).text
                assert "of 60 so far" in fragment or 'id="outcome"' in fragment
                await anyio.sleep(0.01)  # the redrive's own turns, on a busy machine too
        assert "Re-injected 60 dead letters." in page
        assert seen == sorted(seen)
        assert (await c.get("/jobs/999")).status_code == 404
        assert (await c.get("/fragments/jobs/999")).status_code == 404


async def test_a_change_that_fails_says_how_far_it_got() -> None:
    release = anyio.Event()

    async def work(progress: Callable[[int], None]) -> str:
        progress(5)
        await release.wait()
        raise StorageError("the disk is full")

    async with anyio.create_task_group() as group:
        jobs = Jobs(group)
        job = jobs.start("Re-injected dead letters", 10, "/dead-letters", work)
        await anyio.lowlevel.checkpoint()
        assert job.done == 5
        assert job.message is None
        assert jobs.get(job.id) is job
        release.set()
    assert job.failed
    assert job.message == (
        "Re-injected dead letters stopped after 5 of 10: the disk is full. What was done "
        "stays done; running it again takes up the rest."
    )


async def test_mounted_under_a_prefix_with_a_token_callable(tmp_path: Path) -> None:
    seen: list[str] = []

    def check(token: str) -> bool:
        seen.append(token)
        return token == "opsy"

    async with Bus.open(str(tmp_path / "live.db")) as bus:
        await Shop().install(bus)
        await orders(bus, range(1, 4), bad=True)
        api = Starlette(routes=[Mount("/ops", app=dashboard.app(bus, token=check))])
        async with client(api) as c:
            assert (await c.get("/ops/")).status_code == 401
            first = await c.get("/ops/dead-letters?token=opsy&subscription=billing")
            assert first.status_code == 303
            assert first.headers["location"] == "/ops/dead-letters?subscription=billing"
            assert "Path=/ops" in first.headers["set-cookie"]
            page = await c.get("/ops/dead-letters?subscription=billing")
            assert page.status_code == 200
            assert 'href="/ops/dead-letters/' in page.text
            assert "opsy" in seen
            overview = (await c.get("/ops/")).text
            assert "handler p99" in overview
            assert "live bus · read-only" in overview


async def test_a_log_that_cannot_be_read_answers_503(tmp_path: Path) -> None:
    async with client(dashboard.file_app(str(tmp_path / "missing.db"))) as c:
        response = await c.get("/")
        assert response.status_code == 503
        assert "could not be read" in response.text


async def test_the_overview_of_a_file_shows_lag_in_seconds(tmp_path: Path) -> None:
    path = tmp_path / "behind.db"
    await make_log(path, bad=0, held=False)
    async with Bus.open(str(path)) as bus:  # no billing here: it falls behind
        for i in range(5):
            await bus.publish("orders", {"id": i})
    async with client(dashboard.file_app(str(path))) as c:
        page = (await c.get("/")).text
    row = re.search(r'data-subscription="billing".*?</tr>', page, re.S)
    assert row
    assert re.search(r'class="num lag">5<', row.group(0))
    assert re.search(r"<td class=\"num\">\d+\.\d</td>", row.group(0))  # seconds behind


def snapshot(at: float, cursor: int) -> Snapshot:
    view = SubscriptionView("s", ("t",), cursor, lag=0, retries=0, dead=0)
    return Snapshot(at, False, cursor, cursor, 0, 0, (view,))


def test_the_history_of_a_file_measures_throughput_by_the_cursor() -> None:
    history = History(samples=3)
    history.record(snapshot(100.0, 0))
    history.record(snapshot(100.5, 10))  # too close: one sample
    history.record(snapshot(102.0, 40))
    assert history.throughput("s") == 20.0
    for i in range(5):
        history.record(snapshot(104.0 + i * 2, 40))
    assert len(history.series("s")) == 3
    assert history.throughput("missing") == 0.0


def test_a_sparkline_draws_a_line_once_there_are_two_points() -> None:
    assert "collecting" in sparkline([1.0], label="a<b")
    assert "a&lt;b" in sparkline([1.0], label="a<b")
    drawn = sparkline([0.0, 2.0, 1.0], label="x", width=100, height=20)
    assert 'points="0.0,18.0 50.0,2.0 100.0,10.0"' in drawn
    assert "polyline" in sparkline([0.0, 0.0], label="idle")
