"""Take docs/dashboard.png: a real gateway (gunicorn, two workers) with a few loopback
upstreams, some traffic, one upstream killed so its instance is ejected, and the dashboard in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, selenium from
requirements-test.txt).

    .venv/bin/python docs/dashboard_screenshot.py [OUTPUT.png]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import SECRET, make_token  # noqa: E402
from tests.integration.test_dashboard_browser import UpstreamProcess  # noqa: E402
from tests.support import READY_TIMEOUT, Gateway, wait_for  # noqa: E402


def main() -> None:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "dashboard.png")
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    upstreams: list[UpstreamProcess] = []
    with tempfile.TemporaryDirectory() as data:
        gateway = Gateway(Path(data), GATEWAY_JWT_SECRET=SECRET, GATEWAY_NODE_ID="edge-1",
                          GATEWAY_EJECTION_SECONDS=600).start()
        driver = None
        stop = threading.Event()
        try:
            layout = {"orders": 2, "users": 1, "billing": 1}
            for name, count in layout.items():
                for _ in range(count):
                    upstream = UpstreamProcess()
                    upstreams.append(upstream)
                    requests.post(gateway.url + "/register_service", timeout=10,
                                  json={"name": name, "address": upstream.address,
                                        "metadata": {"zone": "a"}}).raise_for_status()
            # users has a limit of its own, which the traffic below goes over
            requests.put(gateway.url + "/_gateway/services/users/policy", timeout=10,
                         json={"rate_limit": "10/second, burst=5"}).raise_for_status()
            auth = {"Authorization": f"Bearer {make_token('screenshot')}"}
            for name in layout:
                gateway.wait_routable(f"/{name}/", auth, status=(200, 429))
            options = webdriver.ChromeOptions()
            options.binary_location = shutil.which("chromium") or "chromium"
            for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                             "--disable-gpu", "--window-size=1280,900", "--hide-scrollbars"):
                options.add_argument(argument)
            driver = webdriver.Chrome(options=options,
                                      service=Service(shutil.which("chromedriver")))
            driver.get(gateway.url + "/_gateway/ui")

            def traffic() -> None:  # a little, all along, so the page has rates to show
                session = requests.Session()
                while not stop.is_set():
                    for name in ("orders", "orders", "users"):
                        try:
                            session.get(f"{gateway.url}/{name}/", headers=auth, timeout=10)
                        except requests.RequestException:  # the gateway is stopping
                            return
                    stop.wait(0.05)

            sender = threading.Thread(target=traffic, daemon=True)
            sender.start()
            time.sleep(2.5)
            upstreams[-1].kill()  # billing's only upstream: refused, then ejected

            def billing_ejected() -> bool:
                for _ in range(6):
                    requests.get(f"{gateway.url}/billing/", timeout=10,
                                 headers={**auth, "Connection": "close"})
                try:
                    state = driver.find_elements(
                        By.CSS_SELECTOR, 'tr.service-detail[data-service="billing"] td.state')
                    return bool(state) and state[0].text == "ejected"
                except StaleElementReferenceException:  # redrawn meanwhile
                    return False

            wait_for(billing_ejected, READY_TIMEOUT, 0.5, "billing to show as ejected")
            driver.find_element(
                By.CSS_SELECTOR, 'tr.service-detail[data-service="billing"] summary').click()
            time.sleep(2.5)  # one more refresh, so rates cover a full interval
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, max(700, min(int(height) + 160, 2200)))
            output.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(output))
            print(f"wrote {output}")
        finally:
            stop.set()
            if driver is not None:
                driver.quit()
            gateway.stop()
            for upstream in upstreams:
                upstream.kill()


if __name__ == "__main__":
    main()
