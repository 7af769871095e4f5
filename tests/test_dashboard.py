"""The operators' dashboard, in Debian's Chromium against the real `web` process and worker.

CI installs the browser with `apt-get install -y chromium chromium-driver`; nothing is
downloaded at run time (Selenium is given both paths, so Selenium Manager never runs).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from emp_tasks import workers
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.store.broker import app
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
    modules = {ref.removeprefix("/static/dashboard/") for ref in references}
    for script in STATIC.glob("*.js"):
        modules |= set(re.findall(r'from "\./([A-Za-z/.]+\.js)"', script.read_text()))
    assert "vendor/uPlot.esm.js" in modules
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
    # Its running time and queue wait come from the events too, not only from REST.
    assert page.find_element(By.CSS_SELECTOR, f"{row} [data-field=duration]").text.endswith(" s")
    assert page.find_element(By.CSS_SELECTOR, f"{row} [data-field=wait]").text.endswith(" s")

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
            "payload": {
                "duration_s": 0.3,
                "progress_steps": 1,
                "images": 1,
                "log_lines": ["loading model", "<b>text, not markup</b>"],
            },
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
    logs = wait(
        page,
        lambda d: d.find_elements(
            By.CSS_SELECTOR, "[data-testid=detail-logs] li[data-attempt='1']"
        ),
        "the detail shows no log lines",
    )
    assert [line.text.split("#", 1)[1] for line in logs] == [
        "1 info loading model",
        "1 info <b>text, not markup</b>",
    ]
    assert not page.find_elements(By.CSS_SELECTOR, "[data-testid=detail-logs] b")


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


# --- what is wrong right now, at desktop and phone sizes -------------------------------------

SIZES = {"desktop": (1400, 900), "phone": (390, 844)}


@contextlib.contextmanager
def window_size(driver: WebDriver, size: str) -> Iterator[None]:
    """The browser window at one of SIZES for the block, restored afterwards."""
    before = driver.get_window_size()
    driver.set_window_size(*SIZES[size])
    try:
        yield
    finally:
        driver.set_window_size(before["width"], before["height"])


def fits_the_width(driver: WebDriver) -> bool:
    """The page itself never scrolls sideways (tables scroll inside their panels)."""
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def api_submit(base: str, body: dict, who: str = "admin") -> dict:
    response = requests.post(base + "/api/steps", json=body, headers=headers(who), timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def api_status(base: str, step_id: str) -> str:
    response = requests.get(f"{base}/api/steps/{step_id}", headers=headers("admin"), timeout=10)
    return response.json()["step"]["status"]


def test_vendored_chart_library_is_served_with_its_licence(client):
    for name in ("uPlot.esm.js", "uPlot.min.css", "uPlot.LICENSE", "README.md"):
        assert (STATIC / "vendor" / name).exists(), name
    assert client.get("/static/dashboard/vendor/uPlot.esm.js").status_code == 200
    assert "uplot@1.6.32" in (STATIC / "vendor" / "README.md").read_text()
    assert "(v1.6.32)" in (STATIC / "vendor" / "uPlot.esm.js").read_text()[:400]


@pytest.mark.parametrize("size", SIZES)
def test_charts_and_a_step_detail_fit_the_page(page, live_api, system, size):
    done = api_submit(live_api, {"service": "simulation", "payload": {"duration_s": 0.1}})
    failing = {"service": "simulation", "payload": {"fail": "fatal"}, "max_retries": 0}
    failed = api_submit(live_api, failing)
    wait_for(lambda: api_status(live_api, done["step_id"]) == "completed", timeout_s=30)
    wait_for(lambda: api_status(live_api, failed["step_id"]) == "failed", timeout_s=30)
    with window_size(page, size):
        go_live(page)

        def drawn(chart: str) -> dict | None:
            return page.execute_script(
                "const box = document.querySelector(`[data-testid=chart-${arguments[0]}]`);"
                " const canvas = box && box.querySelector('canvas');"
                " return canvas && canvas.width > 0 ? {total: Number(box.dataset.total),"
                " points: Number(box.dataset.points), width: box.getBoundingClientRect().width}"
                " : null;",
                chart,
            )

        for chart in ("throughput", "failures"):
            wait(page, lambda d, c=chart: (drawn(c) or {}).get("total", 0) > 0, f"no {chart} data")
        for chart in ("pending", "wait"):
            wait(page, lambda d, c=chart: (drawn(c) or {}).get("points", 0) >= 60, f"no {chart}")
        assert drawn("wait")["total"] > 0  # the steps above waited for their worker
        if size == "desktop":
            page.find_element(By.CSS_SELECTOR, "#series-window [data-window=day]").click()
            wait(page, lambda d: drawn("throughput")["points"] >= 96, "no day of buckets")
            assert drawn("throughput")["total"] > 0
        assert all(drawn(c)["width"] <= SIZES[size][0] for c in ("throughput", "failures"))

        row = f'tr[data-step-id="{failed["step_id"]}"]'
        code = wait(page, lambda d: visible_text(d, f"{row} [data-testid=step-error-code]"), "")
        assert code == "SIMULATED_FATAL"
        assert fits_the_width(page)

        page.find_element(By.ID, "step-search").send_keys(done["step_id"])
        page.find_element(By.ID, "step-search-go").click()
        wait(
            page,
            lambda d: visible_text(d, "#step-detail [data-testid=detail-status]") == "completed",
            "the step's detail did not open",
        )
        wait(
            page, lambda d: d.find_elements(By.CSS_SELECTOR, "#step-detail [data-attempt='1']"), ""
        )
        assert fits_the_width(page), "the open detail makes the page scroll sideways"
        detail = page.find_element(By.ID, "step-detail").rect
        listing = page.find_element(By.CSS_SELECTOR, "#steps .split > .list").rect
        if size == "phone":  # stacked: the detail below the list, as wide as it
            assert detail["y"] >= listing["y"] + listing["height"] - 1
            assert detail["width"] >= listing["width"] - 2
        else:  # side by side
            assert detail["x"] >= listing["x"] + listing["width"] - 1
        page.save_screenshot(str(ARTIFACTS / f"dashboard-{size}.png"))


def test_stranded_and_unserved_queues_are_warned_at_the_top(browser, services, start_worker):
    """Unserved: steps for a service no worker serves. Stranded: then a capable worker
    joins, but the queue was purged, so it takes nothing (the relay's resend comes only
    after 30 s; this web process calls a queue stranded after 2 s)."""
    service = "dash-stranded-ui"
    with web_process(services, "web-stranded.log", 16, EMP_STRANDED_AFTER_S="2") as base:
        browser.get(base + "/")
        browser.execute_script("window.localStorage.clear()")
        browser.get(base + "/")
        go_live(browser)
        ids = [api_submit(base, {"service": service})["step_id"] for _ in range(2)]
        queue = requests.get(f"{base}/api/steps/{ids[0]}", headers=headers("admin"), timeout=10)
        queue = queue.json()["step"]["queue"]
        alert = f'[data-testid=queue-alert][data-queue-name="{queue}"]'

        def shown(code: str, saying: str = "2 pending") -> str | None:
            text = visible_text(browser, f"{alert}[data-code={code}]")
            return text if text and saying in text else None

        unserved = wait(browser, lambda d: shown("NO_CAPABLE_WORKER"), "no unserved warning")
        assert unserved.startswith("Unserved queue") and service in unserved
        with app.connection_for_write() as connection:  # `celery purge -Q <queue>`
            assert connection.default_channel.queue_purge(queue) == 2
        start_worker(service, "dash-stranded-worker")
        try:
            for size in ("desktop", "phone"):
                with window_size(browser, size):
                    stranded = wait(
                        browser,
                        lambda d: shown("STRANDED", "the broker holds no task"),
                        f"no stranded warning ({size})",
                    )
                    assert stranded.startswith("Stranded queue") and "2 pending" in stranded
                    assert fits_the_width(browser), size
                    row = f'tr[data-queue-name="{queue}"] [data-code=STRANDED]'
                    assert browser.find_elements(By.CSS_SELECTOR, row)
                    browser.save_screenshot(str(ARTIFACTS / f"dashboard-stranded-{size}.png"))
        finally:
            for step_id in ids:
                requests.post(
                    f"{base}/api/steps/{step_id}/cancel",
                    json={},
                    headers=headers("admin"),
                    timeout=10,
                )


def test_step_list_filters_by_error_code_and_finds_an_id_prefix(page, live_api, system):
    failing = {"service": "simulation", "payload": {"fail": "fatal"}, "max_retries": 0}
    failed = api_submit(live_api, failing)["step_id"]
    quick = api_submit(live_api, {"service": "simulation"})["step_id"]
    for step_id in (failed, quick):
        wait_for(lambda s=step_id: api_status(live_api, s) in {"completed", "failed"}, 30)
    go_live(page)
    page.find_element(By.ID, "step-error-filter").send_keys("SIMULATED_FATAL")
    page.find_element(By.CSS_SELECTOR, "#step-filters button[type=submit]").click()

    def listed(driver: WebDriver) -> list[str]:
        return driver.execute_script(
            "return [...document.querySelectorAll('#step-rows tr[data-step-id]')]"
            ".map(r => r.dataset.stepId)"
        )

    wait(page, lambda d: failed in listed(d) and quick not in listed(d), "not filtered by code")
    codes = {e.text for e in page.find_elements(By.CSS_SELECTOR, "[data-testid=step-error-code]")}
    assert codes == {"SIMULATED_FATAL"}

    page.find_element(By.ID, "step-error-filter").clear()
    search = page.find_element(By.ID, "step-search")
    search.send_keys(quick[:13])
    page.find_element(By.ID, "step-search-go").click()
    wait(page, lambda d: quick in listed(d), "the id prefix did not find the step")
    assert all(step_id.startswith(quick[:13]) for step_id in listed(page))
    assert page.find_element(By.ID, "step-detail").get_attribute("hidden") is not None


def test_wide_workflow_graph_fits_the_panel_and_zooms(page, live_api, system):
    go_live(page)
    chain = [
        {
            "service": "simulation",
            "payload": {"model": "sdxl-base", "prompt": "a lighthouse at dusk"},
            "metadata": {"name": f"stage-{i}"},
            **({"depends_on": [i - 1]} if i else {}),
        }
        for i in range(12)
    ]
    response = requests.post(
        live_api + "/api/workflows",
        json={"name": "wide chain", "steps": chain},
        headers=headers("admin"),
        timeout=10,
    )
    assert response.status_code == 201, response.text
    row = f'tr[data-workflow-id="{response.json()["workflow_id"]}"]'
    wait(page, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} button").click() or True, "")
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid=dag-node]")) == 12, "")
    labels = wait(
        page,
        lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=dag-label]")],
        "no labels",
    )
    assert "#0 stage-0" in labels and "#11 stage-11" in labels
    hints = {e.text for e in page.find_elements(By.CSS_SELECTOR, "[data-testid=dag-hint]")}
    assert hints == {"model sdxl-base"}

    def scale() -> float:
        return float(
            page.find_element(By.CSS_SELECTOR, "[data-testid=dag-frame]").get_attribute(
                "data-scale"
            )
        )

    def fitted(driver: WebDriver) -> bool:
        frame = driver.find_element(By.CSS_SELECTOR, "[data-testid=dag-frame]").rect
        drawing = driver.find_element(By.ID, "workflow-dag").rect
        return drawing["width"] <= frame["width"] + 1 and scale() < 1

    wait(page, fitted, "the wide graph does not fit the panel's width")
    fit = scale()
    page.find_element(By.CSS_SELECTOR, "[data-testid=dag-zoom-in]").click()
    assert scale() > fit
    page.find_element(By.CSS_SELECTOR, "[data-testid=dag-fit]").click()
    assert scale() == fit
    drawing = page.find_element(By.ID, "workflow-dag")
    ActionChains(page).scroll_from_origin(ScrollOrigin.from_element(drawing), 0, -300).perform()
    wait(page, lambda d: scale() > fit, "the wheel did not zoom in")

    def left_edge() -> float:
        return float(drawing.get_dom_attribute("viewBox").split()[0])

    before = left_edge()
    ActionChains(page).move_to_element_with_offset(drawing, -40, 0).click_and_hold().move_by_offset(
        -120, 0
    ).release().perform()
    assert left_edge() > before  # dragged left: the view moved right along the chain
    assert fits_the_width(page)


def test_machine_removal_asks_first(page, live_api):
    machine = "machine-dash-remove"
    workers.register("dash-remove-worker", machine, Capabilities(services=["dash-remove"]))
    go_live(page)
    remove = f'[data-machine-id="{machine}"] [data-testid=machine-remove]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, remove), "the machine is not listed")

    page.execute_script("window.confirm = () => false")
    page.find_element(By.CSS_SELECTOR, remove).click()
    listed = requests.get(
        f"{live_api}/api/machines/{machine}", headers=headers("admin"), timeout=10
    )
    assert listed.status_code == 200  # not confirmed: nothing happened

    page.execute_script("window.asked = []; window.confirm = (q) => window.asked.push(q) > 0")
    wait(page, lambda d: d.find_element(By.CSS_SELECTOR, remove).click() or True, "")
    wait(
        page,
        lambda d: not d.find_elements(By.CSS_SELECTOR, f'[data-machine-id="{machine}"]'),
        "the removed machine is still listed",
    )
    (question,) = page.execute_script("return window.asked")
    assert machine in question
    gone = requests.get(f"{live_api}/api/machines/{machine}", headers=headers("admin"), timeout=10)
    assert gone.status_code == 404


def test_worker_rows_show_loaded_models_and_attempts_cold_or_warm(page, live_api, system):
    go_live(page)
    ids = []
    for _ in range(2):
        response = requests.post(
            live_api + "/api/steps",
            json={"service": "simulation", "payload": {"model": "dash-model"}},
            headers=headers("admin"),
            timeout=10,
        )
        ids.append(response.json()["step_id"])
        wait(
            page,
            lambda d, step_id=ids[-1]: (
                requests.get(
                    f"{live_api}/api/steps/{step_id}", headers=headers("admin"), timeout=10
                ).json()["step"]["status"]
                == "completed"
            ),
            "the step did not complete",
        )
    loaded = '[data-worker-id="test-worker-1"] [data-testid=worker-loaded]'
    wait(
        page,
        lambda d: "simulation: dash-model" in (visible_text(d, loaded) or ""),
        "the worker row does not show the model its backend holds",
    )
    cell = "#step-detail [data-attempt='1'] [data-field=cold-start]"
    for step_id, expected in zip(ids, ("cold (", "warm"), strict=True):
        page.find_element(By.ID, "step-search").clear()
        page.find_element(By.ID, "step-search").send_keys(step_id)
        page.find_element(By.ID, "step-search-go").click()
        wait(
            page,
            lambda d, step_id=step_id, expected=expected: (
                d.find_element(By.CSS_SELECTOR, "[data-testid=detail-id]").text == step_id
                and (visible_text(d, cell) or "").startswith(expected)
            ),
            f"the attempt is not shown {expected.strip(' (')}",
        )
