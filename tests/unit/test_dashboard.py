"""The dashboard's server side (gateway_app/dashboard.py) through the Flask test client: who
gets the page, what it is told, and the overview it reads. The page's script is tested in
Chromium (tests/integration/test_dashboard_browser.py)."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

FAR = {"REMOTE_ADDR": "10.9.8.7"}  # not in GATEWAY_ADMIN_ALLOW
ADMIN = "admin-token-for-dashboard-unit-tests-0123"


@pytest.fixture
def guarded(make_app):
    app = make_app(GATEWAY_ADMIN_TOKEN=ADMIN)
    client = app.test_client()
    assert client.post("/register_service",
                       json={"name": "secret-svc", "address": "http://10.0.0.5:8000"}
                       ).status_code == 201
    return app, client


def test_an_admin_address_gets_the_page_with_its_rules(client):
    page = client.get("/_gateway/ui")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert 'data-locked="false"' in html
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    # Everything it loads is the gateway's own: no CDN, nothing inline.
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith("/_gateway/static/") for s in sources), sources
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    for source in sources:
        with client.get(source, environ_base=FAR) as asset:  # open: no data in them
            assert asset.status_code == 200 and asset.get_data()


def test_anyone_else_gets_401_and_the_token_form_but_no_data(guarded):
    _, client = guarded
    page = client.get("/_gateway/ui", environ_base=FAR)
    assert page.status_code == 401
    assert page.headers["WWW-Authenticate"] == 'Bearer realm="gateway-admin"'
    html = page.get_data(as_text=True)
    assert 'data-locked="true"' in html and 'id="token-form"' in html
    assert "secret-svc" not in html
    refused = client.get("/_gateway/ui/overview", environ_base=FAR)
    assert refused.status_code == 401 and refused.get_json()["error"] == "unauthorized"
    wrong = client.get("/_gateway/ui/overview", environ_base=FAR,
                       headers={"Authorization": "Bearer not-it"})
    assert wrong.status_code == 401
    allowed = client.get("/_gateway/ui/overview", environ_base=FAR,
                         headers={"Authorization": f"Bearer {ADMIN}"})
    assert allowed.status_code == 200 and allowed.get_json()["store"]["up"] is True


def test_a_registration_credential_is_not_for_the_dashboard(guarded):
    app, client = guarded
    credential, _ = app.extensions["gateway"].credentials.mint(["secret-svc"], 60, None)
    headers = {"Authorization": f"Bearer {credential}"}
    for path in ("/_gateway/ui", "/_gateway/ui/overview"):
        response = client.get(path, environ_base=FAR, headers=headers)
        assert response.status_code == 403, path
        assert response.get_json()["error"] == "forbidden"


def test_the_overview_names_the_store_kind_never_its_url(app, client):
    gw = app.extensions["gateway"]
    body = client.get("/_gateway/ui/overview").get_json()
    assert body["store"] == {"kind": "memory", "up": True, "down_since": None, "error": None,
                             "loaded": True}
    assert body["node"] == gw.settings.node_id and body["ready"] is True
    rules = {rule.rule for rule in app.url_map.iter_rules()}
    assert body["eject_after"] == 5 and body["features"] == {
        "metrics": "/_gateway/metrics" in rules,
        "events": "/_gateway/services/<name>/instances/<instance>/events" in rules}
    gw.settings = dataclasses.replace(
        gw.settings, store="redis://:hunter2@10.0.0.1:6379/0")
    body = client.get("/_gateway/ui/overview")
    assert body.get_json()["store"]["kind"] == "redis"
    assert b"hunter2" not in body.get_data() and b"10.0.0.1" not in body.get_data()


def test_the_overview_says_when_the_store_is_down(app, client, monkeypatch):
    registry = app.extensions["gateway"].registry
    monkeypatch.setattr(registry, "_down_since", time.time() - 5)
    monkeypatch.setattr(registry, "_last_error", "the store did not answer")
    store = client.get("/_gateway/ui/overview").get_json()["store"]
    assert store["up"] is False and store["error"] == "the store did not answer"
    assert store["down_since"].endswith("Z")


def test_the_page_asks_only_for_the_endpoints_the_gateway_has(make_app):
    """The metrics and the instance events come from other modules; the page is told whether
    they are there, so it never fetches a 404 (a console error in the browser)."""
    app = make_app()
    app.add_url_rule("/_gateway/metrics", "fake_metrics", lambda: "")
    app.add_url_rule("/_gateway/services/<name>/instances/<instance>/events", "fake_events",
                     lambda name, instance: {"events": []})
    client = app.test_client()
    html = client.get("/_gateway/ui").get_data(as_text=True)
    assert 'data-metrics="true"' in html and 'data-events="true"' in html
    features = client.get("/_gateway/ui/overview").get_json()["features"]
    assert features == {"metrics": True, "events": True}


def test_static_is_a_service_name_not_the_apps_files(client):
    """No app-wide /static/ route: it would take the path of a service named "static"."""
    with client.get("/_gateway/static/dashboard.js") as script:
        assert script.status_code == 200 and b"GatewayDashboard" in script.get_data()
    response = client.get("/static/dashboard.js")
    assert response.mimetype == "application/json"
    assert response.get_json()["error"] in ("unauthorized", "service_not_found")
