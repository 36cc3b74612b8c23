"""The operator dashboard: its JSON (fast, no browser) and the page in a real headless browser.

The browser test drives Debian's chromium through chromedriver with selenium, on a real run:
a ticket trained into version 1 by the real job path (Ray Train + DeepSpeed on the tiny
model), a second ticket waiting in the queue, a candidate version 2; it saves screenshots
to `test-artifacts/` (or $OBLIVIO_TEST_ARTIFACTS) and checks that a confirmed promote click
moves `live`.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from storage import queue, tokens
from storage.db import transaction
from tests.fixtures.training import FORGET_QA
from tests.fixtures.versions import add_version
from tests.service.conftest import Api, free_socket

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("OBLIVIO_TEST_ARTIFACTS", REPO / "test-artifacts"))
TICKET = {"kind": "forget", "target": "Zorblat", "engine": "npo",
          "forget": {"qa": FORGET_QA}}


# --- the JSON the page reads ----------------------------------------------------------------

def test_overview_timeline_and_retry_for_operators(api: Api) -> None:
    c, op = api.client, api.headers("operator")
    made = c.post("/v1/tickets", headers=op, json=TICKET)
    assert made.status_code == 202, made.text
    ticket_id = made.json()["id"]
    # A worker's attempt fails; the ticket waits out an hour's back-off: retry it now.
    claimed = queue.claim(api.db.sessions, owner="w-1", lease_seconds=60, max_attempts=3)
    assert [t.id for t in claimed] == [uuid.UUID(ticket_id)]
    queue.fail(api.db.sessions, ticket_id=claimed[0].id, owner="w-1", error="boom",
               retry=True, max_attempts=3, retry_delay_seconds=3600)
    assert queue.claim(api.db.sessions, owner="w-2", lease_seconds=60, max_attempts=3) == []

    over = c.get("/v1/dashboard/overview", headers=op)
    assert over.status_code == 200, over.text
    body = over.json()
    assert body["tickets_by_status"]["queued"] == 1 and body["jobs"] == []
    assert [lin["name"] for lin in body["lineages"]] == ["default"]

    retried = c.post(f"/v1/tickets/{ticket_id}/retry", headers=op)
    assert retried.status_code == 200, retried.text
    assert retried.json()["attempts"] == 0 and retried.json()["not_before"] is None
    timeline = c.get(f"/v1/tickets/{ticket_id}", headers=op).json()["timeline"]
    assert [e["event"] for e in timeline] == ["submitted", "claimed", "retry", "retried"]
    again = c.post(f"/v1/tickets/{ticket_id}/retry", headers=op)
    assert again.status_code == 409 and "no failed attempt" in again.json()["message"]
    reclaimed = queue.claim(api.db.sessions, owner="w-2", lease_seconds=60, max_attempts=3)
    assert [t.id for t in reclaimed] == [uuid.UUID(ticket_id)]  # claimable at once
    queue.fail(api.db.sessions, ticket_id=reclaimed[0].id, owner="w-2", error="boom",
               retry=False, max_attempts=3)
    final = c.post(f"/v1/tickets/{ticket_id}/retry", headers=op)
    assert final.status_code == 409 and "file the request again" in final.json()["message"]

    sub = api.headers("submitter")
    assert c.get("/v1/dashboard/overview", headers=sub).status_code == 403
    assert c.post(f"/v1/tickets/{ticket_id}/retry", headers=sub).status_code == 403
    assert c.get("/v1/dashboard/overview").status_code == 401
    page = c.get("/dashboard")
    assert page.status_code == 200 and "operator token" in page.text
    assert "http://" not in page.text.split("<script>")[1].replace(
        "http://www.w3.org/2000/svg", ""), "the page must not load anything from elsewhere"


# --- the page in a real browser -------------------------------------------------------------

def _browser() -> object:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver on this machine (scripts/test.sh installs "
                    "Debian's chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1700", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _retry_stale(action: object, tries: int = 5) -> None:
    """Run a find-and-act on the page; the page re-renders every few seconds, so an
    element found a moment ago may be replaced between finding and clicking it."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(tries):
        try:
            action()  # type: ignore[operator]
            return
        except StaleElementReferenceException:
            if attempt == tries - 1:
                raise
            time.sleep(0.2)


def _uvicorn(app: object) -> Iterator[str]:
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def real_run(tmp_path: Path, tiny_model_dir: Path, ray_cluster) -> Iterator[tuple]:
    """A service with one real job done (v1 live), a queued ticket and a candidate v2."""
    from workers.dispatcher import DispatcherLoop

    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        object_store=f"file://{tmp_path / 'objects'}", base_model=str(tiny_model_dir),
        num_workers=2, zero_stage=2, batch_window_seconds=0.0, lease_seconds=120,
        ray_dashboard_url="http://127.0.0.1:8265",
        recipe={"max_steps": 3, "eval_every": 0, "retain_prompts": 4,
                "retain_max_new_tokens": 8})
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            operator = tokens.create_token(s, role="operator", name="dash-op")[1]
            submitter = tokens.create_token(s, role="submitter", name="dash-sub")[1]
        auth = {"Authorization": f"Bearer {operator}"}
        first = client.post("/v1/tickets", headers=auth, json=TICKET)
        assert first.status_code == 202, first.text
        assert DispatcherLoop(settings.worker_config()).run_once() == 1  # the real job path
        # The random-weight model answers no probe, so its version is held for review: the
        # operator promotes it, as on the dashboard.
        promoted = client.post("/v1/lineages/default/promote", headers=auth, json={"version": 1})
        assert promoted.status_code == 200, promoted.text
        done = client.get(f"/v1/tickets/{first.json()['id']}", headers=auth).json()
        assert done["status"] == "done", done
        assert client.post("/v1/tickets", headers=auth,
                           json={**TICKET, "target": "Quimby"}).status_code == 202
        add_version(app.state.sessions, settings.store_config().open(),
                    lineage="default", adapter_dir=None, candidate=True,
                    metrics={"forget_ratio": 0.35, "utility_ratio": 0.8})
        for url in _uvicorn(app):
            yield url, operator, submitter, client, auth


@pytest.fixture
def registered_run(tmp_path: Path) -> Iterator[tuple]:
    """The same shape as `real_run` (v1 live from a finished job, a queued ticket, a
    candidate v2), written through the queue and registry instead of trained."""
    from storage.models import Job, JobStatus, Lineage, utcnow

    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        object_store=f"file://{tmp_path / 'objects'}", base_model="tiny-test-model",
        ray_dashboard_url="http://127.0.0.1:8265")
    app = create_app(settings)
    with TestClient(app) as client:
        with transaction(app.state.sessions) as s:
            operator = tokens.create_token(s, role="operator", name="dash-op")[1]
            submitter = tokens.create_token(s, role="submitter", name="dash-sub")[1]
        auth = {"Authorization": f"Bearer {operator}"}
        first = client.post("/v1/tickets", headers=auth, json=TICKET).json()
        claimed = queue.claim(app.state.sessions, owner="w", lease_seconds=60, max_attempts=3)
        store = settings.store_config().open()
        with transaction(app.state.sessions) as s:
            job = Job(lineage_id=s.query(Lineage.id).scalar(), engine="npo",
                      status=JobStatus.succeeded, ray_job_id="raytrain_1",
                      ticket_ids=[first["id"]], started_at=utcnow(), finished_at=utcnow())
            s.add(job)
            s.flush()
            job_id = job.id
        v1 = add_version(app.state.sessions, store, lineage="default", adapter_dir=None,
                         promote=True, ticket_ids=[uuid.UUID(first["id"])], job_id=job_id,
                         metrics={"forget_ratio": 0.0, "utility_ratio": 1.0})
        queue.complete(app.state.sessions, ticket_id=claimed[0].id, owner="w",
                       version_id=v1.id, receipt={})
        client.post("/v1/tickets", headers=auth, json={**TICKET, "target": "Quimby"})
        add_version(app.state.sessions, store, lineage="default", adapter_dir=None,
                    candidate=True, metrics={"forget_ratio": 0.35, "utility_ratio": 0.8})
        for url in _uvicorn(app):
            yield url, operator, submitter, client, auth


def test_dashboard_in_a_browser_shows_a_run_and_promotes(real_run: tuple) -> None:
    """The real job path's run (Ray Train + DeepSpeed), seen and acted on in the browser."""
    # v1 was judged against a random-weight base that answered no probe: its ratios are
    # undefined and it is not plotted; v2 (registered with ratios) is.
    check_dashboard_in_browser(real_run, "dashboard", plotted=1)


def test_dashboard_in_a_browser_without_ray(registered_run: tuple) -> None:
    """The same page checks on versions registered directly (fast; no Ray needed)."""
    check_dashboard_in_browser(registered_run, "dashboard-registered", plotted=2)


def check_dashboard_in_browser(run: tuple, name: str, *, plotted: int) -> None:
    """`plotted`: how many versions have both ratios defined (one chart point each)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, operator, submitter, client, auth = run
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = _browser()
    try:
        from selenium.common.exceptions import StaleElementReferenceException

        wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))
        browser.get(f"{url}/dashboard")
        # A submitter token is refused with a reason.
        wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys(submitter)
        browser.find_element(By.ID, "login-button").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "error"), "not an operator token"))

        token = browser.find_element(By.ID, "token")
        token.clear()
        token.send_keys(operator)
        browser.find_element(By.ID, "login-button").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "tr.ticket-row")) == 2)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "svg.forget-utility circle"))
        # Hold the page still while checking it (actions still refresh what they change).
        browser.find_element(By.ID, "live-updates").click()
        time.sleep(1.0)  # let a refresh already in flight land

        rows = browser.find_elements(By.CSS_SELECTOR, "tr.ticket-row")
        statuses = sorted(r.find_elements(By.TAG_NAME, "td")[4].text for r in rows)
        assert statuses == ["done", "queued"]
        assert "queue depth 1" in browser.find_element(By.ID, "queue-summary").text
        v1 = browser.find_element(By.CSS_SELECTOR, 'li.version[data-label="default@v1"]')
        v2 = browser.find_element(By.CSS_SELECTOR, 'li.version[data-label="default@v2"]')
        assert "live" in v1.find_element(By.CSS_SELECTOR, ".node").text
        assert "candidate" in v2.find_element(By.CSS_SELECTOR, ".node").text
        # v2's parent is v1: it is drawn inside v1's subtree.
        assert v1.find_elements(By.CSS_SELECTOR, 'li.version[data-label="default@v2"]')
        points = browser.find_elements(By.CSS_SELECTOR, "svg.forget-utility circle.point")
        assert len(points) == plotted
        job = browser.find_element(By.CSS_SELECTOR, "tr.job-row")
        assert "succeeded" in job.text
        assert job.find_element(By.TAG_NAME, "a").get_attribute("href").startswith(
            "http://127.0.0.1:8265")

        # A ticket's timeline. (The page re-renders every few seconds: find, then act.)
        _retry_stale(lambda: next(r for r in browser.find_elements(By.CSS_SELECTOR,
                                                                   "tr.ticket-row")
                                  if "done" in r.text).click())
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#timeline tr.event")) >= 3)
        events = browser.find_element(By.ID, "timeline").text
        assert "claimed" in events and "done" in events, events
        browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))

        # Promote v2, cancel the first confirmation, then confirm.
        promote = 'li.version[data-label="default@v2"] > .node button.promote'
        _retry_stale(lambda: browser.find_element(By.CSS_SELECTOR, promote).click())
        wait.until(ec.visibility_of_element_located((By.ID, "confirm-cancel"))).click()
        live = client.get("/v1/lineages/default", headers=auth).json()["aliases"]["live"]
        assert live == "default@v1", "cancelling the confirmation must change nothing"
        _retry_stale(lambda: browser.find_element(By.CSS_SELECTOR, promote).click())
        assert "default@v2" in wait.until(
            ec.visibility_of_element_located((By.ID, "confirm-text"))).text
        browser.find_element(By.ID, "confirm-ok").click()
        wait.until(lambda b: "live" in b.find_element(
            By.CSS_SELECTOR, 'li.version[data-label="default@v2"] > .node').text)
        live = client.get("/v1/lineages/default", headers=auth).json()["aliases"]["live"]
        assert live == "default@v2"
        browser.save_screenshot(str(ARTIFACTS / f"{name}-after-promote.png"))
    finally:
        browser.quit()
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
