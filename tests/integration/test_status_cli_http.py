"""``gateway status`` against a real gateway (gunicorn, several workers) and real upstreams,
one of them killed so that its instance is ejected (issue 14, item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import requests

from tests.conftest import make_token
from tests.integration.test_dashboard_browser import ADMIN, ELSEWHERE, UpstreamProcess
from tests.support import READY_TIMEOUT, ROOT, wait_for


def status(gateway, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway_app.cli", "status", *args,
                           "--url", gateway.url], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)


def columns(output: str) -> list[dict[str, str]]:
    """The rows of the first table, by column head, cut where the heads start."""
    lines = output.split("\n\n")[0].splitlines()
    head = lines[0]
    names = head.split()
    starts = [head.index(name) for name in names]
    rows = []
    for line in lines[1:]:
        ends = [*starts[1:], None]
        rows.append({name: line[start:end].strip()
                     for name, start, end in zip(names, starts, ends, strict=True)})
    return rows


def test_status_shows_instances_health_and_the_cause_of_an_ejection(start_gateway):
    gateway = start_gateway(GATEWAY_WORKERS=2, GATEWAY_EJECTION_SECONDS=600)
    auth = {"Authorization": f"Bearer {make_token()}"}
    good, bad = UpstreamProcess(), UpstreamProcess()
    try:
        assert gateway.register("orders", good.address).status_code == 201
        assert gateway.register("billing", bad.address).status_code == 201
        gateway.wait_routable("/orders/", auth)
        gateway.wait_routable("/billing/", auth)
        bad.kill()

        def ejected_everywhere() -> bool:
            for _ in range(4):
                assert gateway.fresh_get("/billing/", auth).status_code >= 500
            listings = [gateway.fresh_get("/_gateway/services").json() for _ in range(8)]
            return all(s["services"][0]["instances"][0].get("ejected_until")
                       or s["services"][0]["instances"][0].get("state") == "ejected"
                       for s in listings)

        wait_for(ejected_everywhere, READY_TIMEOUT, what="every worker to eject billing")
        out = status(gateway)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        rows = columns(out.stdout)
        assert out.stdout.splitlines()[0].split() == [
            "SERVICE", "INSTANCE", "ADDRESS", "STATE", "FAILURES", "IN-FLIGHT", "EJECTED-FOR",
            "CAUSE"]
        billing, orders = rows  # in name order
        assert (billing["SERVICE"], billing["ADDRESS"], billing["STATE"]) == (
            "billing", bad.address, "ejected")
        assert "failure" in billing["CAUSE"].lower(), billing
        assert billing["EJECTED-FOR"].endswith(("m", "s")) and billing["EJECTED-FOR"] != "0s"
        assert (orders["SERVICE"], orders["ADDRESS"], orders["STATE"]) == (
            "orders", good.address, "healthy")
        assert "failure" not in orders["CAUSE"]  # "-", or its last event ("registered"...)

        events = requests.get(f"{gateway.url}/_gateway/services/billing/instances/"
                              f"{billing['INSTANCE']}/events", timeout=10)
        if events.status_code == 200 and events.json()["events"]:
            # The gateway keeps timelines: the recent causes follow, newest last.
            assert "\n\nTIME" in out.stdout
            assert billing["INSTANCE"] in out.stdout.split("\n\n")[1]

        only = status(gateway, "orders", "--json")
        doc = json.loads(only.stdout)
        assert [s["name"] for s in doc["services"]] == ["orders"]
        assert doc["services"][0]["instances"][0]["state"] == "healthy"
        missing = status(gateway, "nothing-here")
        assert missing.returncode == 1
        assert missing.stderr == "gateway: no service named 'nothing-here'\n"
    finally:
        good.kill()
        bad.kill()


def test_status_sends_the_admin_token_from_the_environment(start_gateway):
    gateway = start_gateway(GATEWAY_ADMIN_ALLOW=ELSEWHERE, GATEWAY_ADMIN_TOKEN=ADMIN)
    refused = status(gateway)
    assert refused.returncode == 1 and refused.stderr.startswith("gateway: 401 unauthorized")
    empty = status(gateway, env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    assert empty.returncode == 0 and empty.stdout == "no services registered\n"
