"""The dashboard of a log file (``eventbus serve FILE``) beside the bus that owns it:
read-only unless told, a token on every request when one is set, and changes queued
for the owner as the command line queues them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import eventbus.dashboard as dashboard
from eventbus import Bus

from ._running import Running, Shop, browser, element, orders, serve_in_thread, wait_until

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-token"


class Servers(msgspec.Struct):
    running: Running
    read_only: str
    actions: str
    tokened: str


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    path = tmp_path_factory.mktemp("serve") / "shop.db"
    shop = Shop()
    shop.hold.add(9)
    with Running(path, shop) as running:
        running.call(lambda bus: orders(bus, range(1, 11)))
        running.call(lambda bus: orders(bus, range(100, 104), bad=True))
        running.call(lambda bus: bus.start_workflow("fulfil", {"id": 9}, workflow_id="order-9"))
        stops = []
        urls = []
        for app in (
            dashboard.file_app(str(path)),
            dashboard.file_app(str(path), allow_actions=True),
            dashboard.file_app(str(path), allow_actions=True, token=TOKEN),
        ):
            url, stop = serve_in_thread(app)
            urls.append(url)
            stops.append(stop)
        try:
            yield Servers(running, *urls)
        finally:
            for stop in stops:
                stop()


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = browser()
    try:
        yield d
    finally:
        d.quit()


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no form token on the page"
    return found.group(1)


def test_read_only_shows_no_action_and_its_endpoints_refuse(driver: Any, servers: Servers) -> None:
    from selenium.webdriver.common.by import By

    url = servers.read_only
    driver.get(url + "/dead-letters")
    assert len(driver.find_elements(By.CSS_SELECTOR, "tr.letter")) == 4
    assert "read-only" in driver.find_element(By.TAG_NAME, "header").text
    assert not driver.find_elements(By.CSS_SELECTOR, "form[method=post], button[name=do]")
    assert not driver.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")
    driver.find_element(By.CSS_SELECTOR, "tr.letter a").click()
    wait_until(driver, lambda d: d.find_elements(By.ID, "payload"))
    assert not driver.find_elements(By.TAG_NAME, "button")  # no redrive, no purge
    driver.get(url + "/workflows/order-9")
    assert element(driver, "run-status").text == "running"
    assert not driver.find_elements(By.ID, "cancel-run")
    driver.get(url + "/reconcile")
    assert not driver.find_elements(By.ID, "run-pass")

    # The pages carry no form token (no form), and every action is refused.
    assert 'name="csrf"' not in httpx.get(url + "/dead-letters").text
    token = "guessed"
    for path, data in (
        ("/dead-letters/confirm", {"do": "purge:filter"}),
        ("/dead-letters/apply", {"do": "purge:filter"}),
        ("/workflows/order-9/cancel", {}),
        ("/reconcile", {}),
    ):
        response = httpx.post(url + path, data={"csrf": token, **data})
        assert response.status_code == 403, path
        assert "--allow-actions" in response.text
    assert servers.running.call(lambda bus: bus.dead_letters.count("billing")) == 4


def test_with_a_token_an_anonymous_request_is_refused(driver: Any, servers: Servers) -> None:
    from selenium.webdriver.common.by import By

    url = servers.tokened
    for path in ("/", "/dead-letters", "/fragments/overview", "/workflows/order-9"):
        response = httpx.get(url + path)
        assert response.status_code == 401, path
        assert "needs its token" in response.text
    assert httpx.post(url + "/dead-letters/apply", data={"do": "purge:filter"}).status_code == 401
    wrong = httpx.get(url + "/", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    good = httpx.get(url + "/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200

    # A browser opens it once with ?token=: a cookie carries it on, out of the address.
    driver.get(url + f"/dead-letters?subscription=billing&token={TOKEN}")
    wait_until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.letter"))
    assert "token" not in driver.current_url
    assert "subscription=billing" in driver.current_url
    driver.get(url + "/workflows")
    assert driver.find_elements(By.CSS_SELECTOR, 'tr.run[data-id="order-9"]')
    driver.delete_all_cookies()
    driver.get(url + "/workflows")
    assert "401" in driver.find_element(By.TAG_NAME, "body").text


def test_changes_beside_a_running_bus_are_queued_for_it(servers: Servers) -> None:
    url = servers.actions
    running = servers.running
    token = csrf(httpx.get(url + "/dead-letters").text)
    running.shop.fixed.update(range(100, 104))

    confirm = httpx.post(
        url + "/dead-letters/confirm",
        data={"csrf": token, "do": "redrive:filter", "subscription": "billing"},
    )
    assert re.search(r'confirm-count">4<', confirm.text)
    started = httpx.post(
        url + "/dead-letters/apply",
        data={"csrf": token, "do": "redrive:filter", "subscription": "billing"},
    )
    done = finished(url, started)
    assert f"Queued redrive for the bus that owns the log (pid {os.getpid()})" in done

    cancelled = httpx.post(url + "/workflows/order-9/cancel", data={"csrf": token})
    assert "Queued cancel" in cancelled.text

    async def settled(bus: Bus) -> tuple[int, str]:
        import anyio

        with anyio.fail_after(20):
            while True:
                dead = await bus.dead_letters.count("billing")
                status = (await (await bus.get_workflow("order-9")).status()).status
                if dead == 0 and status == "cancelled":
                    return dead, status
                await anyio.sleep(0.05)

    assert running.call(settled) == (0, "cancelled")
    page = httpx.get(url + "/dead-letters?subscription=billing").text
    assert "no dead letters match" in page


def test_a_reconciliation_pass_reads_the_file(servers: Servers) -> None:
    url = servers.actions
    token = csrf(httpx.get(url + "/reconcile").text)
    page = httpx.post(url + "/reconcile", data={"csrf": token}).text
    assert "OK: nothing lost" in page
    assert "from the log file alone" in page
    assert "billing" in page


def test_a_forged_action_without_the_form_token_is_refused(servers: Servers) -> None:
    response = httpx.post(servers.actions + "/dead-letters/apply", data={"do": "purge:filter"})
    assert response.status_code == 403
    assert "form token" in response.text


def finished(url: str, response: httpx.Response) -> str:
    """The page of a change started in the background, once it has finished."""
    assert response.status_code == 303
    deadline = time.monotonic() + 15
    while 'id="outcome"' not in (page := httpx.get(url + response.headers["location"]).text):
        assert time.monotonic() < deadline, page
        time.sleep(0.02)  # between two looks at the job's page
    return page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_eventbus_serve_serves_a_file_with_a_token(servers: Servers, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "EVENTBUS_DASHBOARD_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventbus", "serve", str(servers.running.path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed before it listens
        assert f"at http://127.0.0.1:{port}/ (read-only)" in line
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "eventbus serve never listened"
        assert response.status_code == 401
        page = httpx.get(f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert page.status_code == 200
        assert "billing" in page.text
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close() if proc.stdout else None
        proc.stderr.close() if proc.stderr else None


def test_eventbus_serve_refuses_a_file_that_is_not_a_log(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "serve", str(tmp_path / "missing.db")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "eventbus:" in result.stderr
    assert not (tmp_path / "missing.db").exists()
