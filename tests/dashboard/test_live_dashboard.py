"""The dashboard mounted next to a live bus, driven in headless Chromium: the pages an
operator uses at night, each written to docs/img as a screenshot."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import eventbus.dashboard as dashboard
from eventbus import Bus

from ._running import Running, Shop, browser, element, orders, screenshot, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = browser()
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    path = tmp_path_factory.mktemp("live") / "shop.db"
    with Running(path, Shop(), lambda bus: dashboard.app(bus, allow_actions=True)) as running:
        running.call(lambda bus: orders(bus, range(1, 41)))
        running.call(lambda bus: orders(bus, range(100, 106), bad=True))
        yield running


def rows(driver: Any) -> dict[str, Any]:
    from selenium.webdriver.common.by import By

    return {
        r.get_attribute("data-seq"): r for r in driver.find_elements(By.CSS_SELECTOR, "tr.letter")
    }


def test_the_overview_updates_when_events_flow(driver: Any, live: Running) -> None:
    from selenium.webdriver.common.by import By

    driver.get(live.url + "/")
    head = wait_until(driver, lambda d: int(d.find_element(By.ID, "head").text))
    dead = 'tr[data-subscription="billing"] .dead'
    assert wait_until(driver, lambda d: d.find_element(By.CSS_SELECTOR, dead).text) == "6"

    live.call(lambda bus: orders(bus, range(200, 260)))

    # The live region is fetched again every two seconds, without a reload.
    wait_until(driver, lambda d: int(d.find_element(By.ID, "head").text) >= head + 60)
    wait_until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "svg.spark polyline")) > 0)
    assert driver.execute_script("return performance.navigation.type") == 0  # no reload
    screenshot(driver, "overview")


def test_a_dead_letter_is_found_by_filter_inspected_redriven_and_disappears(
    driver: Any, live: Running
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    live.call(lambda bus: orders(bus, range(300, 302), bad=True))
    driver.get(live.url + "/dead-letters")
    Select(element(driver, "f-subscription")).select_by_visible_text("billing")
    element(driver, "f-error-type").send_keys("ValueError")
    element(driver, "apply-filter").click()
    wait_until(driver, lambda d: "error_type=ValueError" in d.current_url)
    found = rows(driver)
    assert len(found) == 8
    screenshot(driver, "dead-letters")

    # The letter of order 300: open it.
    seq = max(found, key=int)
    found[seq].find_element(By.TAG_NAME, "a").click()
    wait_until(driver, lambda d: d.find_elements(By.ID, "payload"))
    assert '"id": 301' in element(driver, "payload").text
    assert "card declined for order 301" in element(driver, "error").text
    assert "ValueError" in element(driver, "traceback").text
    driver.set_window_size(1280, 730)  # the letter and its payload; the traceback below
    screenshot(driver, "dead-letter")
    driver.set_window_size(1280, 860)

    live.shop.fixed.add(301)  # the cause is fixed; redrive it
    element(driver, "redrive-one").click()
    assert element(driver, "confirm-count").text == "1"
    element(driver, "confirm").click()
    assert "Re-injected 1 dead letters" in element(driver, "outcome").text

    def gone(d: Any) -> bool:
        d.get(live.url + "/dead-letters?subscription=billing")
        return seq not in rows(d)

    wait_until(driver, gone)
    assert len(rows(driver)) == 7


def test_a_purge_asks_for_confirmation_first(driver: Any, live: Running) -> None:
    from selenium.webdriver.common.by import By

    driver.get(live.url + "/dead-letters?subscription=billing")
    before = rows(driver)
    picked = sorted(before, key=int)[:2]
    for seq in picked:
        before[seq].find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    element(driver, "purge-selected").click()
    text = element(driver, "confirm-text").text
    assert "deletes 2 dead letters for good" in text
    screenshot(driver, "confirm")

    element(driver, "cancel").click()  # nothing purged
    assert set(rows(driver)) == set(before)

    element(driver, "purge-filter").click()
    assert element(driver, "confirm-count").text == str(len(before))
    element(driver, "confirm").click()
    assert f"Purged {len(before)} dead letters" in element(driver, "outcome").text
    element(driver, "back").click()
    assert rows(driver) == {}


def test_a_workflow_runs_steps_are_shown_and_a_run_can_be_cancelled(
    driver: Any, live: Running
) -> None:
    from selenium.webdriver.common.by import By

    async def fulfil(bus: Bus) -> None:
        handle = await bus.start_workflow("fulfil", {"id": 7, "items": 3}, workflow_id="order-7")
        await handle.result(timeout=10)

    live.call(fulfil)
    live.shop.hold.add(8)
    live.call(lambda bus: bus.start_workflow("fulfil", {"id": 8}, workflow_id="order-8"))

    driver.get(live.url + "/workflows")
    wait_until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr.run[data-id="order-8"]'))
    screenshot(driver, "workflows")
    driver.find_element(By.LINK_TEXT, "order-7").click()
    steps = {
        s.get_attribute("data-name"): s.text
        for s in driver.find_elements(By.CSS_SELECTOR, "tr.step")
    }
    assert list(steps) == ["reserve", "charge"]
    assert "done" in steps["reserve"]
    assert '"reserved":7' in steps["reserve"]
    assert "charged order 7" in steps["charge"]
    assert element(driver, "run-status").text == "completed"
    assert not driver.find_elements(By.ID, "cancel-run")  # nothing left to cancel
    screenshot(driver, "workflow-run")

    driver.get(live.url + "/workflows/order-8")
    wait_until(driver, lambda d: "running" in d.find_element(By.ID, "steps").text)
    element(driver, "cancel-run").click()
    assert "Cancelled run order-8" in element(driver, "outcome").text
    element(driver, "back").click()
    assert element(driver, "run-status").text == "cancelled"


def test_a_reconciliation_pass_runs_from_the_page(driver: Any, live: Running) -> None:
    from selenium.webdriver.common.by import By

    driver.get(live.url + "/reconcile")
    assert driver.find_elements(By.ID, "no-report")
    element(driver, "run-pass").click()
    assert element(driver, "verdict").text == "OK: nothing lost"
    names = [r.text.split()[0] for r in driver.find_elements(By.CSS_SELECTOR, "#report tr")[1:]]
    assert {"audit", "billing"} <= set(names)
    screenshot(driver, "reconcile")
