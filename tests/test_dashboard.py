"""The operators' dashboard, in Debian's Chromium against the real `web` process and worker.

CI installs the browser with `apt-get install -y chromium chromium-driver`; nothing is
downloaded at run time (Selenium is given both paths, so Selenium Manager never runs).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import (
    ARTIFACTS,
    KEYS,
    RunningSystem,
    headers,
    process_env,
    wait_for,
    web_process,
)
from tests.fake_emprops import FakeEmprops

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 20
STATIC = Path(__file__).resolve().parent.parent / "web" / "static" / "dashboard"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"the dashboard tests need Chromium and ChromeDriver ({', '.join(missing)} not found):"
            " install them with `apt-get install -y chromium chromium-driver`",
            pytrace=False,
        )
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1500,1900",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, live_api, request) -> Iterator[WebDriver]:
    """The dashboard, freshly loaded with no key stored; a screenshot is kept afterwards."""
    browser.get(live_api + "/")
    browser.execute_script("window.localStorage.clear()")
    browser.get(live_api + "/")
    try:
        yield browser
    finally:
        browser.save_screenshot(str(ARTIFACTS / f"dashboard-{request.node.name}.png"))


def wait(driver: WebDriver, condition, message: str):
    """Poll `condition` for up to WAIT_S; elements the page redraws are looked up again."""
    return WebDriverWait(
        driver, WAIT_S, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition, message)


def visible_text(driver: WebDriver, selector: str) -> str | None:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found and found[0].is_displayed() else None


def use_key(driver: WebDriver, key: str) -> None:
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.ID, "save-key").click()


def go_live(driver: WebDriver) -> None:
    """Enter the admin key and wait until the page follows /ws."""
    use_key(driver, KEYS["admin"])
    wait(
        driver,
        lambda d: d.find_element(By.ID, "live-status").get_attribute("data-state") == "live",
        "the dashboard did not go live over /ws",
    )
    driver.execute_script("window.loadedOnce = true")


# --- the page and its assets ----------------------------------------------------------------


def test_dashboard_is_served_with_only_its_own_assets(client):
    for route in ("/", "/dashboard"):
        response = client.get(route)
        assert response.status_code == 200
        assert response.mimetype == "text/html"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    html = client.get("/").get_data(as_text=True)
    references = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert references and all(ref.startswith("/static/dashboard/") for ref in references)
    modules = {Path(ref).name for ref in references}
    for script in STATIC.glob("*.js"):
        modules |= set(re.findall(r'from "\./([a-z]+\.js)"', script.read_text()))
    for name in modules:
        assert client.get(f"/static/dashboard/{name}").status_code == 200, name


def test_dashboard_is_documented_as_an_open_route(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    for route in ("/", "/dashboard"):
        assert "security" not in paths[route]["get"]


def test_dashboard_scripts_never_parse_text_as_html():
    for script in STATIC.glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source, f"{script.name} uses {sink}"


# --- in the browser -------------------------------------------------------------------------


def test_refused_key_is_explained(page):
    use_key(page, "not-a-valid-key")
    message = wait(
        page,
        lambda d: visible_text(d, "[data-testid=auth-message]"),
        "no message for a refused key",
    )
    assert "401" in message and "key" in message.lower()
    assert page.find_element(By.ID, "live-status").get_attribute("data-state") != "live"


def test_fleet_lists_the_running_worker(page, system):
    go_live(page)
    row = '[data-worker-id="test-worker-1"]'
    wait(page, lambda d: visible_text(d, row), "test-worker-1 is not listed")
    # The fleet table is redrawn as heartbeats arrive: read the status inside a wait,
    # which retries an element that was replaced between finding and reading it.
    status = wait(
        page,
        lambda d: d.find_element(By.CSS_SELECTOR, f"{row} [data-testid=worker-status]").text,
        "test-worker-1 has no status",
    )
    assert status in {"online", "draining"}
    assert page.find_elements(By.CSS_SELECTOR, '[data-machine-id="test-machine-1"]')


def test_customer_key_sees_its_steps_and_is_told_the_fleet_needs_an_admin(page, live_api):
    response = requests.post(
        live_api + "/api/steps",
        json={"service": "simulation"},
        headers=headers("alice"),
        timeout=10,
    )
    step_id = response.json()["step_id"]
    use_key(page, KEYS["alice"])
    wait(
        page,
        lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-step-id="{step_id}"]'),
        "the customer's step is not listed",
    )
    message = wait(
        page,
        lambda d: visible_text(d, "[data-testid=fleet-message]"),
        "no message about the fleet needing an admin key",
    )
    assert "403" in message and "admin" in message
    assert not page.find_elements(By.CSS_SELECTOR, "[data-worker-id]")


def test_step_progress_is_live_and_cancel_works(page, live_api, system):
    go_live(page)
    response = requests.post(
        live_api + "/api/steps",
        json={"service": "simulation", "payload": {"duration_s": 6, "progress_steps": 5}},
        headers=headers("admin"),
        timeout=10,
    )
    assert response.status_code == 201, response.text
    step_id = response.json()["step_id"]
    row = f'tr[data-step-id="{step_id}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, row), "the new step's row did not appear")

    seen: list[float] = []

    def progress_moved_twice(driver: WebDriver) -> bool:
        value = driver.find_element(By.CSS_SELECTOR, f"{row} [data-testid=step-progress]")
        current = float(value.get_attribute("value"))
        if not seen or seen[-1] != current:
            seen.append(current)
        return len(seen) >= 3

    wait(page, progress_moved_twice, "the step's progress did not move twice live")
    assert seen == sorted(seen) and seen[-1] < 100, seen

    page.find_element(By.CSS_SELECTOR, f"{row} [data-testid=step-cancel]").click()
    wait(
        page,
        lambda d: (
            d.find_element(By.CSS_SELECTOR, f"{row} [data-testid=step-status]").text == "cancelled"
        ),
        "the step is not shown as cancelled",
    )
    step = requests.get(
        f"{live_api}/api/steps/{step_id}", headers=headers("admin"), timeout=10
    ).json()["step"]
    assert step["status"] == "cancelled"
    assert page.execute_script("return window.loadedOnce") is True  # no reload happened
    page.save_screenshot(str(ARTIFACTS / "dashboard.png"))


def test_step_detail_shows_attempts_and_events(page, live_api, system):
    response = requests.post(
        live_api + "/api/steps",
        json={
            "service": "simulation",
            "payload": {"duration_s": 0.3, "progress_steps": 1, "images": 1},
        },
        headers=headers("admin"),
        timeout=10,
    )
    step_id = response.json()["step_id"]
    go_live(page)
    page.find_element(By.ID, "step-search").send_keys(step_id)
    page.find_element(By.ID, "step-search-go").click()
    wait(
        page,
        lambda d: visible_text(d, "#step-detail [data-testid=detail-status]") == "completed",
        "the step's detail does not show it completed",
    )
    wait(
        page,
        lambda d: (
            "step_completed" in d.find_element(By.ID, "step-detail").text
            and d.find_elements(By.CSS_SELECTOR, "#step-detail [data-attempt='1']")
        ),
        "the detail lacks the attempt or the step_completed event",
    )
    wait(
        page,
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "[data-testid=detail-id]").text == step_id
            and "completed" in d.find_element(By.CSS_SELECTOR, "[data-attempt='1']").text
        ),
        "the detail does not show the step's id and its completed attempt",
    )
    output = requests.get(
        f"{live_api}/api/steps/{step_id}", headers=headers("admin"), timeout=10
    ).json()["step"]["result"]["outputs"][0]
    thumbnail = wait(
        page,
        lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=detail-outputs] img"),
        "the detail shows no thumbnail of the step's output",
    )[0]
    assert thumbnail.get_attribute("src") == output["url"]
    link = page.find_element(By.CSS_SELECTOR, "[data-testid=detail-outputs] a")
    assert link.get_attribute("href") == output["url"]
    assert "image/png" in page.find_element(By.CSS_SELECTOR, "[data-output='0']").text


def test_without_the_socket_the_page_polls(page, live_api, system):
    """A WebSocket that never connects: the page says so and still shows new steps."""
    script = page.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": "window.WebSocket = class extends EventTarget {"
            " constructor() { super(); this.readyState = 3;"
            " setTimeout(() => this.onclose && this.onclose({code: 1006}), 10); }"
            " send() {} close() {} }; window.WebSocket.OPEN = 1;"
        },
    )
    try:
        page.refresh()
        use_key(page, KEYS["admin"])
        response = requests.post(
            live_api + "/api/steps",
            json={"service": "simulation"},
            headers=headers("admin"),
            timeout=10,
        )
        status = f'tr[data-step-id="{response.json()["step_id"]}"] [data-testid=step-status]'
        wait(page, lambda d: visible_text(d, status) == "completed", "no new step by polling")
        live = page.find_element(By.ID, "live-status")
        assert live.get_attribute("data-state") != "live"
        assert "polling" in live.text
    finally:
        page.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]}
        )


def test_workflow_dag_has_one_node_per_step(page, live_api, system):
    go_live(page)
    name = '<img src=x onerror="window.injected = true"> diamond'
    quick = {"service": "simulation", "payload": {"duration_s": 0.2}}
    response = requests.post(
        live_api + "/api/workflows",
        json={
            "name": name,
            "steps": [
                quick,
                {**quick, "depends_on": [0]},
                {**quick, "depends_on": [0]},
                {**quick, "depends_on": [1, 2]},
            ],
        },
        headers=headers("admin"),
        timeout=10,
    )
    assert response.status_code == 201, response.text
    workflow_id = response.json()["workflow_id"]
    row = f'tr[data-workflow-id="{workflow_id}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, row), "the workflow's row did not appear")
    wait(
        page,
        lambda d: name in d.find_element(By.CSS_SELECTOR, row).text,
        "the workflow's name is not shown as text",
    )
    opened = "the workflow could not be opened"
    wait(page, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} button").click() or True, opened)

    nodes = "#workflow-dag [data-testid=dag-node]"

    def drawn(driver: WebDriver) -> list[dict]:
        return driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(n => ({"
            " index: Number(n.dataset.stepIndex), status: n.dataset.status,"
            " x: n.transform.baseVal.consolidate().matrix.e}))",
            nodes,
        )

    wait(page, lambda d: len(drawn(d)) == 4, "no DAG of 4 nodes")
    wait(
        page,
        lambda d: {node["status"] for node in drawn(d)} == {"completed"},
        "the DAG's nodes did not all turn completed",
    )
    column = {node["index"]: node["x"] for node in drawn(page)}
    assert column[0] < column[1] == column[2] < column[3]
    assert len(page.find_elements(By.CSS_SELECTOR, "#workflow-dag .edges path")) == 4
    assert page.execute_script("return window.injected") is None


def test_workflow_detail_shows_its_emprops_notification_and_replays_it(browser, services, system):
    emprops = FakeEmprops().start()
    env = {"EMPROPS_API_URL": emprops.url, "EMPROPS_API_KEY": "k", "EMPROPS_RETRY_BASE_S": "0.1"}
    notifier = RunningSystem(
        ["emprops"], process_env(services, **env), ARTIFACTS / "dashboard-emprops.log"
    )
    try:
        with web_process(services, "web-emprops.log", 16, **env) as base:
            browser.get(base + "/")
            browser.execute_script("window.localStorage.clear()")
            browser.get(base + "/")
            go_live(browser)
            response = requests.post(
                base + "/api/workflows",
                json={
                    "name": "for emprops",
                    "steps": [{"service": "simulation", "payload": {}}],
                    "emprops": {"job_id": "job-dash-1", "collection_id": "col-9"},
                },
                headers=headers("admin"),
                timeout=10,
            )
            assert response.status_code == 201, response.text
            workflow_id = response.json()["workflow_id"]
            row = f'tr[data-workflow-id="{workflow_id}"]'
            wait(
                browser,
                lambda d: d.find_element(By.CSS_SELECTOR, f"{row} button").click() or True,
                "the workflow could not be opened",
            )
            box = "[data-testid=workflow-emprops]"
            wait(
                browser,
                lambda d: (visible_text(d, box) or " ·  · ").split(" · ")[2].startswith("notified"),
                "the EmProps notification was not shown as notified",
            )
            shown = visible_text(browser, box)
            assert "job job-dash-1" in shown and "collection col-9" in shown
            assert "1 attempt" in shown and "not notified" not in shown
            browser.find_element(By.CSS_SELECTOR, "[data-testid=workflow-emprops-replay]").click()
            wait_for(lambda: len(emprops.successes("job-dash-1")) == 2, timeout_s=30)
            wait(
                browser,
                lambda d: "2 attempts" in (visible_text(d, box) or ""),
                "the replay was not shown",
            )
    finally:
        notifier.stop()
        emprops.stop()
