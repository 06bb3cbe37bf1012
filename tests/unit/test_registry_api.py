"""The registry API through the Flask test client (README: The registry)."""

import json

import pytest

from tests.conftest import iter_listing


def listing(client):
    return sorted((name, inst["address"]) for name, inst in iter_listing(client))


def test_seed_text_body_registers_and_reregistering_is_200(client):
    first = client.post("/register_service", data="hello_service,http://localhost:9090\n")
    assert first.status_code == 201
    body = first.get_json()
    assert body["name"] == "hello_service"
    assert body["instance"]["address"] == "http://localhost:9090"
    again = client.post("/register_service", data="  hello_service , http://localhost:9090/ ")
    assert again.status_code == 200
    assert again.get_json()["instance"]["id"] == body["instance"]["id"]
    assert again.get_json()["instance"]["registered_at"] == body["instance"]["registered_at"]
    assert listing(client) == [("hello_service", "http://localhost:9090")]


def test_json_body_with_ttl_weight_metadata(client):
    doc = {"name": "api", "address": "http://127.0.0.1:9000/v1", "ttl": 30, "weight": 5,
           "metadata": {"zone": "a"}}
    response = client.post("/register_service", json=doc)
    assert response.status_code == 201
    inst = response.get_json()["instance"]
    assert (inst["ttl"], inst["weight"], inst["metadata"]) == (30, 5, {"zone": "a"})
    assert inst["expires_at"].endswith("Z") and inst["health"] == "unknown"
    # JSON detected by its first character even without the content type
    response = client.post("/register_service", data=json.dumps({**doc, "ttl": None}),
                           content_type="text/plain")
    assert response.status_code == 200
    inst = response.get_json()["instance"]
    assert inst["ttl"] is None and inst["expires_at"] is None  # the lease was dropped


@pytest.mark.parametrize("body, content_type", [
    ("", "text/plain"),
    ("   \n", "text/plain"),
    ("hello_service", "text/plain"),
    ("hello_service,", "text/plain"),
    (",http://localhost:9090", "text/plain"),
    ("bad name,http://localhost:9090", "text/plain"),
    ("_gateway,http://localhost:9090", "text/plain"),
    ("x,ftp://localhost", "text/plain"),
    ("x,http://169.254.169.254", "text/plain"),
    ("x,http://[fe80::1]", "text/plain"),
    ("x,http://0.0.0.0:9090", "text/plain"),
    ("{not json", "application/json"),
    ("[1, 2]", "application/json"),
    ('{"name": "x"}', "application/json"),
    ('{"name": 5, "address": "http://a"}', "application/json"),
    ('{"name": "x", "address": "http://a", "ttl": true}', "application/json"),
    ('{"name": "x", "address": "http://a", "ttl": 0}', "application/json"),
    ('{"name": "x", "address": "http://a", "weight": "3"}', "application/json"),
    ('{"name": "x", "address": "http://a", "metadata": {"a": 1}}', "application/json"),
    (b"x,http://a\xff", "text/plain"),
])
def test_bad_registrations_are_400_and_change_nothing(client, body, content_type):
    client.post("/register_service", data="keep,http://localhost:1")
    response = client.post("/register_service", data=body, content_type=content_type)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"] == "bad_request"
    assert listing(client) == [("keep", "http://localhost:1")]


#: Under the 64 KiB body limit, yet deep enough that json.loads alone raises RecursionError.
DEEP = "[" * 60000
VALID = '"name": "a", "address": "http://127.0.0.1:1"'


@pytest.mark.parametrize("path, body", [
    ("/register_service", DEEP),
    ("/register_service", '{"name": ' + DEEP),
    ("/register_service", '{"name": ' + "[" * 40 + "]" * 40 + "}"),  # valid JSON, too deep
    ("/deregister_service", DEEP),
    ("/deregister_service", '{"name": ' + DEEP),
    ("/register_service", '{' + VALID + ', "metadata": {"k": "\\ud800"}}'),
    ("/register_service", '{' + VALID + ', "metadata": {"\\udfff": "v"}}'),
    ("/register_service", '{"name": "\\ud800", "address": "http://127.0.0.1:1"}'),
    ("/deregister_service", '{"name": "a", "address": "http://\\ud800"}'),
    ("/register_service", '{' + VALID + ', "ttl": NaN}'),
    ("/register_service", '{' + VALID + ', "ttl": Infinity}'),
    ("/register_service", '{' + VALID + ', "weight": -Infinity}'),
    ("/register_service", '{' + VALID + ', "ttl": 1e400}'),
    ("/register_service", '{' + VALID + ', "weight": ' + "9" * 5000 + '}'),
])
def test_hostile_json_is_400_and_changes_nothing(client, path, body):
    client.post("/register_service", data="a,http://127.0.0.1:1")
    for content_type in ("application/json", "text/plain"):
        response = client.post(path, data=body, content_type=content_type)
        assert response.status_code == 400, response.get_json()
        assert response.get_json()["error"] == "bad_request"
        assert listing(client) == [("a", "http://127.0.0.1:1")]
        assert client.get("/_gateway/services/a").get_json()["instances"][0]["metadata"] == {}


def test_oversized_registration_is_413(client):
    response = client.post("/register_service", data="x," + "a" * 70000)
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"
    assert listing(client) == []


def test_deregister_forms(client):
    client.post("/register_service", data="svc,http://localhost:1")
    client.post("/register_service", data="svc,http://localhost:2")
    client.post("/register_service", data="other,http://localhost:3")
    response = client.post("/deregister_service", data="svc,http://LOCALHOST:1/")
    assert response.status_code == 200
    assert listing(client) == [("other", "http://localhost:3"), ("svc", "http://localhost:2")]
    assert client.post("/deregister_service", data="svc,http://localhost:1").status_code == 404
    assert client.post("/deregister_service", json={"name": "svc"}).status_code == 200
    assert client.post("/deregister_service", data="svc").status_code == 404
    assert client.post("/deregister_service", data="svc").get_json()["error"] == \
        "service_not_found"
    assert client.post("/deregister_service", data="").status_code == 400
    assert listing(client) == [("other", "http://localhost:3")]


def test_rest_forms(client):
    inst = client.post("/register_service", json={
        "name": "svc", "address": "http://localhost:1", "ttl": 60}).get_json()["instance"]
    assert client.get("/_gateway/services/svc").get_json()["instances"][0]["id"] == inst["id"]
    assert client.get("/_gateway/services/nope").status_code == 404

    beat = client.put(f"/_gateway/services/svc/instances/{inst['id']}/heartbeat")
    assert beat.status_code == 200 and beat.get_json()["expires_at"] >= inst["expires_at"]
    missing = client.put("/_gateway/services/svc/instances/0000/heartbeat")
    assert missing.status_code == 404 and missing.get_json()["error"] == "instance_not_found"
    missing = client.put("/_gateway/services/nope/instances/0000/heartbeat")
    assert missing.get_json()["error"] == "service_not_found"

    deleted = client.delete(f"/_gateway/services/svc/instances/{inst['id']}")
    assert deleted.status_code == 200 and deleted.get_json()["id"] == inst["id"]
    assert client.get("/_gateway/services/svc").status_code == 404  # last instance gone

    client.post("/register_service", data="svc,http://localhost:1")
    assert client.delete("/_gateway/services/svc").status_code == 200
    assert client.delete("/_gateway/services/svc").status_code == 404


def test_heartbeat_without_lease_is_a_harmless_200(client):
    inst = client.post("/register_service", data="svc,http://localhost:1").get_json()["instance"]
    beat = client.put(f"/_gateway/services/svc/instances/{inst['id']}/heartbeat")
    assert beat.status_code == 200 and beat.get_json()["expires_at"] is None


def test_health_is_open_to_anyone(client):
    response = client.get("/_gateway/health", environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


OUTSIDE = {"REMOTE_ADDR": "203.0.113.9"}


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/register_service", "svc,http://localhost:9"),
    ("POST", "/deregister_service", "keep"),
    ("GET", "/_gateway/services", None),
    ("GET", "/_gateway/services/keep", None),
    ("DELETE", "/_gateway/services/keep", None),
])
def test_outsiders_get_401_and_change_nothing(make_app, method, path, body):
    client = make_app(GATEWAY_ADMIN_TOKEN="admin-token-123").test_client()
    client.post("/register_service", data="keep,http://localhost:1")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "admin-token-123"}):
        response = client.open(path, method=method, data=body, headers=headers,
                               environ_base=OUTSIDE)
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"
    assert listing(client) == [("keep", "http://localhost:1")]


def test_admin_token_authorises_from_anywhere(make_app):
    client = make_app(GATEWAY_ADMIN_TOKEN="admin-token-123").test_client()
    response = client.post("/register_service", data="svc,http://localhost:9",
                           headers={"Authorization": "Bearer admin-token-123"},
                           environ_base=OUTSIDE)
    assert response.status_code == 201


def test_forwarded_for_is_believed_only_from_trusted_proxies(make_app):
    client = make_app(GATEWAY_TRUSTED_PROXIES="10.0.0.5").test_client()
    spoofed = {"X-Forwarded-For": "127.0.0.1"}
    response = client.get("/_gateway/services", headers=spoofed, environ_base=OUTSIDE)
    assert response.status_code == 401
    via_proxy = client.get("/_gateway/services", headers=spoofed,
                           environ_base={"REMOTE_ADDR": "10.0.0.5"})
    assert via_proxy.status_code == 200
    outsider_via_proxy = client.get("/_gateway/services",
                                    headers={"X-Forwarded-For": "127.0.0.1, 203.0.113.9"},
                                    environ_base={"REMOTE_ADDR": "10.0.0.5"})
    assert outsider_via_proxy.status_code == 401


def test_wrong_method_on_gateway_path_is_405_before_any_token(client):
    for method, path in [("GET", "/register_service"), ("PUT", "/deregister_service"),
                         ("POST", "/_gateway/services"), ("DELETE", "/_gateway/health")]:
        response = client.open(path, method=method)
        assert response.status_code == 405, (method, path)
        assert response.get_json()["error"] == "method_not_allowed"


def test_the_listing_is_paginated_with_a_cursor(client):
    for n in range(250):
        assert client.post("/register_service",
                           data=f"s{n:03d},http://10.0.{n // 250}.{n % 250 + 1}:80"
                           ).status_code == 201
    first = client.get("/_gateway/services").get_json()
    assert [s["name"] for s in first["services"]] == [f"s{n:03d}" for n in range(100)]
    assert first["next"] == "s099"  # the default page is bounded
    names, cursor = [], None
    while True:
        query = {"limit": 64, **({"after": cursor} if cursor else {})}
        page = client.get("/_gateway/services", query_string=query).get_json()
        names += [s["name"] for s in page["services"]]
        assert len(page["services"]) <= 64
        cursor = page["next"]
        if cursor is None:
            break
    assert names == [f"s{n:03d}" for n in range(250)]
    everything = client.get("/_gateway/services?limit=1000").get_json()
    assert len(everything["services"]) == 250 and everything["next"] is None
    # a cursor need not name a service that still exists
    assert client.get("/_gateway/services?after=s1000&limit=2").get_json() == {
        "services": [client.get("/_gateway/services/s101").get_json(),
                     client.get("/_gateway/services/s102").get_json()],
        "next": "s102"}
    assert client.get("/_gateway/services?after=zzz").get_json() == {"services": [],
                                                                     "next": None}


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "limit=", "limit=1.5",
                                   "limit=-1", "after=", "after=bad%20name", "after=_x"])
def test_bad_pagination_is_400(client, query):
    response = client.get(f"/_gateway/services?{query}")
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"
