"""Pages in a real headless browser (Debian's chromium, driven by selenium): the review
page (sign in with a reviewer token, judge by keyboard and by click, with a comment) and
the Data Docs of a validate step, with the network off."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from conftest import review_server

from rlhf_tasks.panel.store import PanelStore

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver "
                                       "(scripts/test.sh installs them)")


@pytest.fixture()
def served(tmp_path):
    store = PanelStore(f"sqlite:///{tmp_path}/panel.db")
    items = [{"prompt_index": i, "prompt": f"worked on the payroll system, errors down {i}0%",
              "response": f"Automated payroll system, cutting errors by {i}0%",
              "model": "secretmodelname"} for i in range(1, 4)]
    batch = store.create_batch(pipeline="rlhf_tuning", run_id="browser", items=items,
                               verdicts_per_item=1, quality_bar="Pass a bullet only if ...",
                               simulated=False)
    token = store.add_reviewer("ann")
    with review_server(store) as url:
        yield url, store, batch, token
    store.dispose()


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1000,900",
                 f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def _wait_for(predicate, timeout=60.0):
    """Until ``predicate()`` holds: a condition, with a generous bound for a loaded machine.

    An element the page re-renders between ``find_element`` and the check is "not yet", as
    WebDriverWait treats it, and is looked up again on the next try."""
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.time() + timeout
    while time.time() < end:
        try:
            if predicate():
                return
        except StaleElementReferenceException:
            pass
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the page")


def test_reviewer_signs_in_and_judges_by_keyboard_and_click(served, browser):
    from selenium.webdriver.common.by import By

    url, store, batch, token = served
    browser.get(url)
    # the login form appears once the page's first API call comes back 401 (after onload)
    _wait_for(lambda: browser.find_element(By.ID, "login").is_displayed())
    assert browser.find_element(By.ID, "main").is_displayed() is False
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    _wait_for(lambda: browser.find_element(By.ID, "item").is_displayed())
    assert "Signed in as ann" in browser.find_element(By.ID, "who").text
    assert "secretmodelname" not in browser.page_source
    assert browser.find_element(By.ID, "quality-bar").text == "Pass a bullet only if ..."
    first = browser.find_element(By.ID, "response").text

    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("p")  # keyboard: pass
    _wait_for(lambda: browser.find_element(By.ID, "response").text != first)
    second = browser.find_element(By.ID, "response").text
    body.send_keys("c")  # keyboard: focus the comment
    browser.switch_to.active_element.send_keys("number looks invented")
    browser.find_element(By.ID, "fail").click()  # click: fail, with the comment
    _wait_for(lambda: browser.find_element(By.ID, "response").text != second)
    shots = os.environ.get("RLHF_SCREENSHOT_DIR")
    if shots:
        browser.save_screenshot(os.path.join(shots, "review-page.png"))
    browser.find_element(By.TAG_NAME, "body").send_keys("f")
    _wait_for(lambda: browser.find_element(By.ID, "done").is_displayed())
    _wait_for(lambda: "You have judged 3 items" in browser.find_element(By.ID, "progress-text").text)

    rows = store.verdict_rows(batch)
    assert [(r["reviewer"], r["passed"], r["source"]) for r in rows] == [
        ("ann", True, "web"), ("ann", False, "web"), ("ann", False, "web")]
    assert rows[1]["comment"] == "number looks invented"
    assert store.progress(batch)["complete"]


def test_data_docs_render_with_the_network_off(tmp_path, browser):
    """Great Expectations' Data Docs, as a validate step writes them, in Chromium with the
    network off: styled by Bootstrap, tables drawn by bootstrap-table, icons from Font
    Awesome, all from the pinned npm packages served with the docs."""
    from rlhf_tasks import config
    from rlhf_tasks.data import validation
    from rlhf_tasks.storage import Storage

    rows = [{"prompt": f"worked on payroll {i}"} for i in range(5)] + [{"prompt": " "}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validation.validate_dataset(
        storage=Storage(str(tmp_path / "art"), [str(tmp_path)]), uri=str(data), kind="prompt",
        fmt="auto", load_tokenizer=None, data_cfg=config.PipelineConfig().data,
        eval_keys=None, docs_dir=tmp_path / "docs")
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    page = next((tmp_path / "docs" / "validations").rglob("*rows.html"))
    browser.get(page.as_uri())
    state = """return {
        jquery: typeof window.jQuery === 'function',
        table: !!(window.jQuery && jQuery.fn.bootstrapTable),
        bootstrapCss: getComputedStyle(document.body).fontFamily.includes('-apple-system'),
        drawn: document.querySelectorAll('.bootstrap-table').length,
        icons: document.fonts.check('16px "Font Awesome 6 Free"'),
        failed: performance.getEntriesByType('resource')
                  .filter(e => e.name.startsWith('http')).map(e => e.name)}"""
    _wait_for(lambda: browser.execute_script(state)["drawn"] > 0)
    got = browser.execute_script(state)
    assert got["jquery"] and got["table"] and got["bootstrapCss"], got
    assert got["failed"] == [], got
    text = browser.execute_script("return document.body.innerText")
    assert "≈16.667% unexpected" in text, text[-2000:]  # 1 of 6 prompts is blank
    browser.get((tmp_path / "docs" / "index.html").as_uri())
    _wait_for(lambda: browser.execute_script(state)["drawn"] > 0)
    assert browser.execute_script(state)["failed"] == []
