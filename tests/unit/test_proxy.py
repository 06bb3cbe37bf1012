"""Forwarding through the Flask test client, upstreams mocked with ``responses`` (README:
Proxying)."""

import time

import pytest
import requests
import responses
from requests.structures import CaseInsensitiveDict

from tests.conftest import make_token

UPSTREAM = "http://upstream.test:9000"


@pytest.fixture
def client(make_app):
    client = make_app().test_client()
    client.post("/register_service", data=f"svc,{UPSTREAM}")
    client.post("/register_service", data=f"based,{UPSTREAM}/api/")
    return client


def sent(upstream, index=-1):
    request = upstream.calls[index].request
    request.headers = CaseInsensitiveDict(request.headers)
    return request


def test_prefix_is_stripped_and_query_kept(client, upstream, auth):
    upstream.add(responses.GET, f"{UPSTREAM}/greet", json={"hi": 1})
    response = client.get("/svc/greet?x=1&y=%2F", headers=auth)
    assert response.status_code == 200 and response.get_json() == {"hi": 1}
    assert sent(upstream).target == "/greet?x=1&y=%2F"


@pytest.mark.parametrize("path, expected", [
    ("/svc", "/"), ("/svc/", "/"), ("/based", "/api"), ("/based/", "/api/"),
    ("/based/greet?x=1", "/api/greet?x=1"), ("/svc/a%2Fb/c%2fd", "/a%2Fb/c%2fd"),
    ("/svc//double", "//double"),
])
def test_base_paths(client, upstream, auth, path, expected):
    upstream.add(responses.GET, responses.matchers.re.compile(f"{UPSTREAM}.*"), body="ok")
    assert client.get(path, headers=auth).status_code == 200
    assert sent(upstream).target == expected


@pytest.mark.parametrize("path", ["/svc/../x", "/svc/./x", "/svc/%2e%2e/x", "/svc/a/%2E",
                                  "/..", "/svc/.."])
def test_dot_segments_are_400_before_the_token(client, upstream, path):
    response = client.get(path, environ_overrides={"RAW_URI": path})
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"
    assert len(upstream.calls) == 0


def test_unknown_service_is_401_without_token_then_404(client, upstream, auth):
    assert client.get("/nope").status_code == 401
    response = client.get("/nope/x", headers=auth)
    assert response.status_code == 404
    assert response.get_json()["error"] == "service_not_found"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_is_checked_and_forwarded_as_itself(client, upstream, auth, method):
    assert client.open("/svc/x", method=method).status_code == 401
    upstream.add(method, f"{UPSTREAM}/x", body="done")
    response = client.open("/svc/x", method=method, headers=auth)
    assert response.status_code == 200
    assert sent(upstream).method == method


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "BREW"])
def test_other_methods_are_405(client, upstream, auth, method):
    response = client.open("/svc/x", method=method, headers=auth)
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"


def test_request_headers(client, upstream):
    upstream.add(responses.POST, f"{UPSTREAM}/h", body="ok")
    token = make_token(sub="alice")
    client.post("/svc/h", data=b"payload", headers={
        "Authorization": f"Bearer {token}",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "drop me",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic abc",
        "X-Authenticated-Subject": "admin",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil.example",
        "X-Request-ID": "client-id-1",
        "X-Custom": "kept",
        "Content-Type": "text/plain",
    }, environ_base={"REMOTE_ADDR": "192.0.2.10"})
    headers = sent(upstream).headers
    for dropped in ("X-Secret-Hop", "Keep-Alive", "Te", "Upgrade", "Proxy-Authorization",
                    "Connection"):
        assert dropped not in headers, dropped
    assert headers["X-Authenticated-Subject"] == "alice"
    assert headers["X-Forwarded-For"] == "192.0.2.10"
    assert headers["X-Forwarded-Host"] == "localhost"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Prefix"] == "/svc"
    assert headers["X-Request-Id"] == "client-id-1"
    assert headers["Host"] == "upstream.test:9000"
    assert headers["Authorization"] == f"Bearer {token}"
    assert headers["X-Custom"] == "kept"
    assert headers["Content-Type"] == "text/plain"
    assert headers["Content-Length"] == "7"


def test_forwarded_chain_from_trusted_proxy_is_extended(make_app, upstream, auth):
    client = make_app(GATEWAY_TRUSTED_PROXIES="10.0.0.0/8").test_client()
    client.post("/register_service", data=f"svc,{UPSTREAM}")
    upstream.add(responses.GET, f"{UPSTREAM}/", body="ok")
    client.get("/svc", headers={**auth, "X-Forwarded-For": "198.51.100.1",
                                "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example"},
               environ_base={"REMOTE_ADDR": "10.1.1.1"})
    headers = sent(upstream).headers
    assert headers["X-Forwarded-For"] == "198.51.100.1, 10.1.1.1"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-Host"] == "api.example"


@pytest.mark.parametrize("incoming, kept", [
    ("abc-123", True), ("a" * 128, True), ("a" * 129, False), ("bad id", False),
    ("<script>", False),
])
def test_request_id_kept_when_sane_else_generated_and_echoed(client, upstream, auth, incoming,
                                                             kept):
    upstream.add(responses.GET, f"{UPSTREAM}/", body="ok")
    response = client.get("/svc", headers={**auth, "X-Request-ID": incoming})
    sent_id = sent(upstream).headers["X-Request-Id"]
    assert response.headers["X-Request-ID"] == sent_id
    assert (sent_id == incoming) is kept


def test_response_headers_cookies_and_hop_by_hop(client, upstream, auth):
    upstream.add(responses.GET, f"{UPSTREAM}/c", body="ok", headers=[
        ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/"),
        ("Connection", "X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
        ("X-App", "yes"),
    ])
    response = client.get("/svc/c", headers=auth)
    assert response.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert "X-Hop" not in response.headers and "Keep-Alive" not in response.headers
    assert response.headers["X-App"] == "yes"


def test_redirects_are_passed_through(client, upstream, auth):
    upstream.add(responses.GET, f"{UPSTREAM}/old", status=302, body="moved",
                 headers={"Location": "/new"})
    response = client.get("/svc/old", headers=auth)
    assert response.status_code == 302
    assert response.headers["Location"] == "/new"
    assert response.data == b"moved"
    assert len(upstream.calls) == 1


@pytest.mark.parametrize("status", [201, 204, 304, 400, 404, 418, 500, 503])
def test_upstream_statuses_are_relayed(client, upstream, auth, status):
    upstream.add(responses.GET, f"{UPSTREAM}/s", status=status, body=b"")
    assert client.get("/svc/s", headers=auth).status_code == status


@pytest.mark.parametrize("error, status, code", [
    (requests.ConnectionError("refused"), 502, "bad_gateway"),
    (requests.ConnectTimeout("slow connect"), 504, "gateway_timeout"),
    (requests.ReadTimeout("slow answer"), 504, "gateway_timeout"),
    (requests.exceptions.SSLError("bad cert"), 502, "bad_gateway"),
])
def test_upstream_failures_map_to_gateway_errors(client, upstream, auth, error, status, code):
    upstream.add(responses.GET, f"{UPSTREAM}/f", body=error)
    response = client.get("/svc/f", headers=auth)
    assert response.status_code == status
    body = response.get_json()
    assert body["error"] == code and body["request_id"] == response.headers["X-Request-ID"]


def test_body_over_the_limit_is_413_and_upstream_untouched(make_app, upstream, auth):
    client = make_app(GATEWAY_MAX_BODY_BYTES=10).test_client()
    client.post("/register_service", data=f"svc,{UPSTREAM}")
    response = client.post("/svc", data=b"x" * 11, headers=auth)
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"
    assert len(upstream.calls) == 0


def test_lapsed_lease_is_503_then_404_once_removed(make_app, upstream, auth, monkeypatch):
    app = make_app()
    client = app.test_client()
    client.post("/register_service", json={"name": "leased", "address": UPSTREAM, "ttl": 5})
    upstream.add(responses.GET, f"{UPSTREAM}/", body="ok")
    assert client.get("/leased", headers=auth).status_code == 200
    # The purge is this test's to do: the background watcher would race it once time moves.
    monkeypatch.setattr(app.extensions["gateway"].registry, "watch_step", lambda: None)
    later = time.time() + 6
    monkeypatch.setattr(time, "time", lambda: later)
    response = client.get("/leased", headers=auth)
    assert response.status_code == 503
    assert response.get_json()["error"] == "no_healthy_instance"
    app.extensions["gateway"].registry.refresh()  # what the watcher does: purge the lapsed
    assert client.get("/leased", headers=auth).status_code == 404
    assert len(upstream.calls) == 1


def test_drained_instance_takes_no_new_requests(client, upstream, auth):
    inst = client.get("/_gateway/services/svc").get_json()["instances"][0]
    drained = client.put(f"/_gateway/services/svc/instances/{inst['id']}/drain")
    assert drained.get_json()["health"] == "draining"
    assert client.get("/svc", headers=auth).status_code == 503
