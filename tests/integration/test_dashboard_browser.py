"""The dashboard at /_gateway/ui in real headless Chromium, against real gunicorn and real
loopback upstreams (issue 14, item 5).

These tests need Debian's ``chromium`` and ``chromium-driver`` and selenium. Where Chromium is
absent they skip and say why; with ``CI=true`` they fail instead (.ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import requests

from tests.conftest import make_token
from tests.support import (
    READY_TIMEOUT,
    ROOT,
    SHUTDOWN_POLL,
    UpstreamServer,
    free_port,
    wait_for,
)

ELSEWHERE = "192.0.2.0/24"  # TEST-NET-1: nobody here calls from it
ADMIN = "admin-token-for-dashboard-tests-0123456789"


class UpstreamProcess:
    """An upstream in its own process (tests/upstream_app.py), so that killing it closes
    every connection the gateway holds to it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.upstream_app",
                                      str(self.port)], cwd=ROOT, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _need_chromium() -> tuple[str, str]:
    """Chromium and its driver, or skip (fail under CI=true) with the reason."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -r requirements-test.txt)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None:
        missing.append("chromium (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        reason = "the dashboard's browser tests need " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; under CI=true they must run, not skip")
        pytest.skip(reason)
    assert binary is not None and driver is not None
    return binary, driver


@pytest.fixture
def browser():
    binary, driver_path = _need_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000", "--no-proxy-server"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(READY_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[dict]:
    """The browser console's errors since the last call, less messages containing one of
    ``allowed``."""
    return [entry for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(a in entry["message"] for a in allowed)]


def wait_page(driver, predicate, what: str, timeout: float = READY_TIMEOUT):
    """Wait until ``predicate(driver)`` is truthy (the page refreshes on its own)."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )

    def attempt():
        try:
            return predicate(driver)
        except NoSuchElementException:  # not drawn yet
            return None
        except StaleElementReferenceException:  # redrawn between the find and the read
            return None

    return wait_for(attempt, timeout, 0.1, what)


def cells(driver, service: str, cls: str) -> list[str]:
    """The text of the ``cls`` cells of ``service``'s instance rows."""
    from selenium.webdriver.common.by import By

    return [cell.text for cell in driver.find_elements(
        By.CSS_SELECTOR, f'tr.service-detail[data-service="{service}"] tr.instance td.{cls}')]


def overview(gateway, headers: dict | None = None) -> dict:
    return requests.get(gateway.url + "/_gateway/ui/overview", headers=headers or {},
                        timeout=10).json()


def test_the_page_lists_a_registered_service_and_refreshes_on_its_own(
        start_gateway, upstream, browser):
    from selenium.webdriver.common.by import By

    gateway = start_gateway()
    assert gateway.register("svc", upstream.address).status_code == 201
    browser.get(gateway.url + "/_gateway/ui")
    wait_page(browser, lambda d: cells(d, "svc", "address") == [upstream.address],
              "the page to list svc and its instance")
    assert browser.title == "Gateway dashboard"
    # From an admin network no token is needed, and the form for one is not shown.
    assert not browser.find_element(By.ID, "token-form").is_displayed()
    node = overview(gateway)["node"]
    wait_page(browser, lambda d: d.find_element(By.ID, "node").text == f"node {node}",
              "the node's name")
    assert "up" in browser.find_element(By.ID, "store").text

    # Traffic, then a second service, with no reload: the page redraws itself.
    auth = {"Authorization": f"Bearer {make_token()}"}
    gateway.wait_routable("/svc/", auth)
    with UpstreamServer() as other:
        assert gateway.register("other", other.address).status_code == 201
        wait_page(browser, lambda d: cells(d, "other", "address") == [other.address],
                  "the page to show a service registered after it loaded")
    wait_page(browser, lambda d: cells(d, "svc", "state") == ["healthy"],
              "svc's instance to be healthy after its traffic")

    if overview(gateway)["features"]["metrics"]:
        def rate_shown(d):
            gateway.fresh_get("/svc/", auth)
            rate = d.find_element(By.CSS_SELECTOR, 'tr.service[data-service="svc"] td.rate')
            return rate.text not in ("–", "") and float(rate.text) > 0

        wait_page(browser, rate_shown, "svc's request rate from the metrics")
    else:
        note = browser.find_element(By.ID, "metrics-note")
        assert note.is_displayed() and "Metrics unavailable" in note.text
    assert console_errors(browser) == []


def test_the_page_shows_the_instance_ejected_with_its_cause(start_gateway, browser):
    from selenium.webdriver.common.by import By

    gateway = start_gateway(GATEWAY_EJECTION_SECONDS=600)
    auth = {"Authorization": f"Bearer {make_token()}"}
    workers = int(gateway.env["GATEWAY_WORKERS"])
    upstream = UpstreamProcess()
    try:
        assert gateway.register("svc", upstream.address).status_code == 201
        gateway.wait_routable("/svc/", auth)
        browser.get(gateway.url + "/_gateway/ui")
        wait_page(browser, lambda d: cells(d, "svc", "state") == ["healthy"],
                  "the page to show svc's instance healthy")
    finally:
        upstream.kill()
    # The upstream is gone: connections are refused, requests fail, the instance is ejected.

    def ejected_everywhere() -> bool:
        for _ in range(2 * workers):
            assert gateway.fresh_get("/svc/", auth).status_code >= 500
        listings = [gateway.fresh_get("/_gateway/services").json() for _ in range(4 * workers)]
        return all(s["services"][0]["instances"][0].get("ejected_until")
                   or s["services"][0]["instances"][0].get("state") == "ejected"
                   for s in listings)

    wait_for(ejected_everywhere, READY_TIMEOUT, what="every worker to eject the instance")
    wait_page(browser, lambda d: cells(d, "svc", "state") == ["ejected"],
              "the page to show the instance ejected")
    cause = cells(browser, "svc", "cause")[0]
    assert "failure" in cause.lower(), cause
    assert browser.find_element(By.CSS_SELECTOR, "#count-unhealthy").text == "1"
    # The timeline names the transition: the gateway's events, or what the page saw.
    timeline = browser.find_element(
        By.CSS_SELECTOR, 'tr.service-detail[data-service="svc"] details.timeline')
    timeline.click()
    wait_page(browser, lambda d: "ejected" in d.find_element(
        By.CSS_SELECTOR, 'tr.service-detail[data-service="svc"] details.timeline').text
        or "failure" in d.find_element(
        By.CSS_SELECTOR, 'tr.service-detail[data-service="svc"] details.timeline').text,
        "the timeline to show the ejection")
    assert console_errors(browser) == []


def test_the_admin_token_form_keeps_the_token_for_the_tab(start_gateway, upstream, browser):
    from selenium.webdriver.common.by import By

    gateway = start_gateway(GATEWAY_ADMIN_ALLOW=ELSEWHERE, GATEWAY_ADMIN_TOKEN=ADMIN)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    registered = requests.post(gateway.url + "/register_service", headers=admin, timeout=10,
                               json={"name": "svc", "address": upstream.address})
    assert registered.status_code == 201
    page = requests.get(gateway.url + "/_gateway/ui", timeout=10)
    assert page.status_code == 401 and "svc" not in page.text  # the page holds no data

    browser.get(gateway.url + "/_gateway/ui")
    notice = browser.find_element(By.ID, "notice")
    wait_page(browser, lambda d: "admin token" in notice.text, "the page to ask for the token")
    assert cells(browser, "svc", "address") == []
    assert browser.find_element(By.ID, "token-form").is_displayed()

    def use(token: str) -> None:
        browser.find_element(By.ID, "token-input").send_keys(token)
        browser.find_element(By.ID, "token-use").click()

    use("not-the-token")
    wait_page(browser, lambda d: "refused" in d.find_element(By.ID, "notice").text,
              "the page to say the token was refused")
    use(ADMIN)
    wait_page(browser, lambda d: cells(d, "svc", "address") == [upstream.address],
              "the page to list svc with the admin token")
    assert browser.execute_script("return sessionStorage.getItem('gateway-admin-token')") \
        == ADMIN
    browser.refresh()  # the tab keeps it
    wait_page(browser, lambda d: cells(d, "svc", "address") == [upstream.address],
              "the page to list svc again after a reload")
    browser.find_element(By.ID, "token-forget").click()
    assert browser.execute_script("return sessionStorage.getItem('gateway-admin-token')") \
        is None
    # The 401s: the page itself (served with the form) and the wrong token's first request.
    print(browser.get_log("browser"))
    assert console_errors(browser, allowed=("401",)) == []


SCRAPE_1 = """\
# HELP gateway_requests_total Requests.
# TYPE gateway_requests_total counter
gateway_requests_total{service="svc",method="GET",code="200"} 100
gateway_requests_total{service="a\\"b,c",method="GET",code="200"} 7
gateway_request_duration_seconds_bucket{service="svc",le="0.005"} 50
gateway_request_duration_seconds_bucket{service="svc",le="0.01"} 90
gateway_request_duration_seconds_bucket{service="svc",le="0.1"} 100
gateway_request_duration_seconds_bucket{service="svc",le="+Inf"} 100
gateway_rate_limited_total{service="svc"} 3
gateway_store_up 1
"""

SCRAPE_2 = """\
gateway_requests_total{service="svc",method="GET",code="200"} 190
gateway_requests_total{service="svc",method="POST",code="502"} 10
gateway_requests_total{service="a\\"b,c",method="GET",code="200"} 2
gateway_request_duration_seconds_bucket{service="svc",le="0.005"} 100
gateway_request_duration_seconds_bucket{service="svc",le="0.01"} 180
gateway_request_duration_seconds_bucket{service="svc",le="0.1"} 200
gateway_request_duration_seconds_bucket{service="svc",le="+Inf"} 200
gateway_rate_limited_total{service="svc"} 23
gateway_token_refusals_total{reason="expired"} 4
gateway_store_up 0
"""


def test_the_page_computes_rates_errors_and_p99_from_two_scrapes(gateway, browser):
    browser.get(gateway.url + "/_gateway/ui")
    wait_page(browser, lambda d: d.execute_script("return !!window.GatewayDashboard"),
              "the page's script")
    result = browser.execute_script("""
        const G = window.GatewayDashboard;
        const a = G.digest(G.parseMetrics(arguments[0]));
        const b = G.digest(G.parseMetrics(arguments[1]));
        const r = G.compare(a, b, 10);
        return {svc: r.services["svc"], other: r.services['a"b,c'], rate: r.rate,
                limitedRate: r.limitedRate, storeUp: b.storeUp, refusals: b.tokenRefusals,
                p99Inf: G.quantile(0.99, [[0.1, 10], [Infinity, 100]]),
                p50: G.quantile(0.5, [[0.1, 0], [0.2, 100], [Infinity, 100]]),
                none: G.quantile(0.99, [[0.1, 0], [Infinity, 0]])};
    """, SCRAPE_1, SCRAPE_2)
    svc = result["svc"]
    assert svc["rate"] == pytest.approx(10.0)        # 100 more requests in 10 s
    assert svc["errorRate"] == pytest.approx(0.1)    # 10 of them 5xx
    assert svc["p99"] == pytest.approx(0.091)        # 99th of 100: 9/10 into (0.01, 0.1]
    assert svc["limitedRate"] == pytest.approx(2.0)
    # A counter that went down was reset (a worker restarted): it counts from zero.
    assert result["other"]["rate"] == pytest.approx(0.2)
    assert result["rate"] == pytest.approx(10.2)
    assert (result["storeUp"], result["refusals"]) == (0, {"expired": 4})
    assert result["p99Inf"] == pytest.approx(0.1)   # in +Inf: the highest finite bound
    assert result["p50"] == pytest.approx(0.15)
    assert result["none"] is None
    assert console_errors(browser) == []


@pytest.fixture
def served_app(tmp_path):
    """A gateway app served by werkzeug on loopback, for routes a test adds to it: the
    metrics and instance events the page reads where a gateway has them."""
    import threading

    from werkzeug.serving import make_server

    from gateway_app import create_app
    from tests.conftest import SECRET

    app = create_app({"GATEWAY_STORE": "memory://", "GATEWAY_WORKERS": "1",
                      "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_JWT_SECRET": SECRET})
    servers = []

    def serve():
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, args=(SHUTDOWN_POLL,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield app, serve
    for server in servers:
        server.shutdown()
        server.server_close()
    app.extensions["gateway"].close()


def fake(app, path: str, view) -> None:
    """Answer ``path`` with ``view``: in place of the gateway's own route where it has one."""
    for rule in app.url_map.iter_rules():
        if rule.rule == path:
            app.view_functions[rule.endpoint] = view
            return
    app.add_url_rule(path, f"fake_{view.__name__}", view)


def test_the_page_draws_rates_p99_refusals_and_timelines_from_the_gateways_api(
        served_app, browser):
    from flask import Response
    from selenium.webdriver.common.by import By

    app, serve = served_app
    scrapes = [0]

    def metrics() -> Response:
        n = scrapes[0] = scrapes[0] + 1  # each scrape: 20 more requests, 2 of them 502
        return Response(
            f'gateway_requests_total{{service="svc",method="GET",code="200"}} {18 * n}\n'
            f'gateway_requests_total{{service="svc",method="GET",code="502"}} {2 * n}\n'
            f'gateway_request_duration_seconds_bucket{{service="svc",le="0.005"}} {19 * n}\n'
            f'gateway_request_duration_seconds_bucket{{service="svc",le="0.1"}} {20 * n}\n'
            f'gateway_request_duration_seconds_bucket{{service="svc",le="+Inf"}} {20 * n}\n'
            f'gateway_rate_limited_total{{service="svc"}} {3 * n}\n'
            f'gateway_token_refusals_total{{reason="expired"}} 4\n'
            'gateway_store_up 1\n', mimetype="text/plain")

    cause = "5 consecutive failures: connection refused"

    def events(name: str, instance: str) -> dict:
        return {"events": [{"time": 1700000000.0, "node": "n1", "worker": 42,
                            "cause": "probe passed", "value": None},
                           {"time": 1700000001.5, "node": "n1", "worker": 42,
                            "cause": cause, "value": 5}]}

    fake(app, "/_gateway/metrics", metrics)
    fake(app, "/_gateway/services/<name>/instances/<instance>/events", events)
    client = app.test_client()
    assert client.post("/register_service", json={"name": "svc",
                                                  "address": "http://127.0.0.1:9"}
                       ).status_code == 201
    listed = client.get("/_gateway/services").get_json()["services"][0]["instances"][0]
    url = serve()
    browser.get(url + "/_gateway/ui")
    row = 'tr.service[data-service="svc"]'
    wait_page(browser, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} td.p99").text
              == "81 ms", "p99 from the buckets' increase (19 of 20 under 5 ms)")
    assert browser.find_element(By.CSS_SELECTOR, f"{row} td.errors").text == "10.0%"
    assert float(browser.find_element(By.CSS_SELECTOR, f"{row} td.rate").text) > 0
    assert float(browser.find_element(By.CSS_SELECTOR, f"{row} td.limited").text) > 0
    assert not browser.find_element(By.ID, "metrics-note").is_displayed()
    refusals = browser.find_element(By.ID, "refusals").text
    assert "rate limit: svc" in refusals and "token: expired" in refusals
    # The cause is the listing's last one where it has one, else the newest event's; the
    # timeline lists the events newest first.
    assert cells(browser, "svc", "cause") == [listed.get("last_cause") or cause]
    browser.find_element(By.CSS_SELECTOR, 'tr.service-detail[data-service="svc"] summary'
                         ).click()
    items = wait_page(browser, lambda d: [li.text for li in d.find_elements(
        By.CSS_SELECTOR, 'tr.service-detail[data-service="svc"] details[open] li')],
        "the open timeline")
    assert len(items) == 2 and cause in items[0] and "n1 pid 42" in items[0]
    assert "probe passed" in items[1]
    assert console_errors(browser) == []
