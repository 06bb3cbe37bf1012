"""Per-service policies: the API, transformations, auth none, timeouts (issue: policies)."""

import gzip
import json

import pytest
import responses
from requests.structures import CaseInsensitiveDict

from gateway_app.errors import BadRequest
from gateway_app.policies import MAX_JSON_ADD_DEPTH, validate_policy

UPSTREAM = "http://upstream.test:9000"
SEED_POLICY = {
    "request_headers": {"add": {"X-Custom-Header": "My API Gateway"}},
    "response_headers": {"add": {"X-Custom-Header": "My API Gateway"}},
    "response_json": {"add": {"custom": "This is a custom message"}},
}


@pytest.fixture
def client(make_app):
    client = make_app().test_client()
    client.post("/register_service", data=f"svc,{UPSTREAM}")
    return client


def put_policy(client, doc, name="svc"):
    return client.put(f"/_gateway/services/{name}/policy", json=doc)


def sent_headers(upstream):
    return CaseInsensitiveDict(upstream.calls[-1].request.headers)


# -- the API ---------------------------------------------------------------------------------


def test_policy_create_read_replace_delete(client):
    assert client.get("/_gateway/services/svc/policy").status_code == 404
    created = put_policy(client, {"rate_limit": "10/second", "auth": "none"})
    assert created.status_code == 201
    stored = created.get_json()
    assert stored["rate_limit"] == "10/second" and stored["strip_prefix"] is True
    assert client.get("/_gateway/services/svc/policy").get_json() == stored
    replaced = put_policy(client, {"strip_prefix": False})
    assert replaced.status_code == 200 and replaced.get_json()["rate_limit"] is None
    assert client.delete("/_gateway/services/svc/policy").status_code == 200
    missing = client.delete("/_gateway/services/svc/policy")
    assert missing.status_code == 404 and missing.get_json()["error"] == "policy_not_found"


def test_policy_may_precede_instances_and_outlive_them(client):
    assert put_policy(client, {"auth": "none"}, name="future").status_code == 201
    client.post("/register_service", data=f"future,{UPSTREAM}")
    client.post("/deregister_service", data="future")
    assert client.get("/_gateway/services/future").status_code == 404
    assert client.get("/_gateway/services/future/policy").get_json()["auth"] == "none"


@pytest.mark.parametrize("doc", [
    [], "x", {"unknown": 1}, {"strip_prefix": "yes"}, {"connect_timeout": 0},
    {"read_timeout": -1}, {"read_timeout": True}, {"rate_limit": "lots"}, {"rate_limit": 5},
    {"auth": "basic"}, {"request_headers": {"add": {"X-Forwarded-For": "1.1.1.1"}}},
    {"request_headers": {"remove": ["X-Request-ID"]}},
    {"request_headers": {"add": {"X-Authenticated-Subject": "root"}}},
    {"request_headers": {"add": {"Host": "evil"}}},
    {"request_headers": {"add": {"Connection": "close"}}},
    {"request_headers": {"add": {"X-Ok": "line\r\nInjected: 1"}}},
    {"request_headers": {"add": {"Bad Name": "v"}}},
    {"request_headers": {"add": ["X-A"]}},
    {"request_headers": {"replace": {}}},
    {"response_headers": {"add": {"X-Request-ID": "mine"}}},
    {"response_headers": {"remove": ["RateLimit-Remaining"]}},
    {"response_headers": {"add": {"Transfer-Encoding": "chunked"}}},
    {"response_json": {"add": ["x"]}},
    {"response_json": {"merge": {}}},
    {"response_json": {"add": {"big": "x" * 20000}}},
])
def test_bad_policies_are_400_and_change_nothing(client, doc):
    put_policy(client, {"auth": "none"})
    response = put_policy(client, doc)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"] == "bad_request"
    assert client.get("/_gateway/services/svc/policy").get_json()["auth"] == "none"


@pytest.mark.parametrize("body", [
    "[" * 60000,  # json.loads alone raises RecursionError
    '{"response_json": {"add": {"x": ' + "[" * 40 + "]" * 40 + "}}}",
    '{"response_json": {"add": {"x": "\\ud800"}}}',
    '{"response_json": {"add": {"\\udc00": 1}}}',
    '{"request_headers": {"add": {"X-A": "\\ud800"}}}',
    '{"response_json": {"add": {"x": NaN}}}',
    '{"response_json": {"add": {"x": Infinity}}}',
    '{"response_json": {"add": {"x": -Infinity}}}',
    '{"response_json": {"add": {"x": 1e400}}}',
    '{"read_timeout": NaN}',
    '{"rate_limit": "' + "9" * 400 + '/second"}',  # was stored: then every request was a 500
    '{"rate_limit": "' + "9" * 5000 + '/second"}',
    '{"rate_limit": "10/second, burst=' + "9" * 400 + '"}',
    '{"rate_limit": "1000000001/minute"}',
    '{"response_json": {"add": {"x": ' + "[" * 20 + "]" * 20 + "}}}",  # parses; add too deep
    '{"response_json": {"add": {"x": 9007199254740992}}}',
])
def test_hostile_policy_json_is_400_and_changes_nothing(client, body):
    put_policy(client, {"auth": "none"})
    response = client.put("/_gateway/services/svc/policy", data=body,
                          content_type="application/json")
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"] == "bad_request"
    assert client.get("/_gateway/services/svc/policy").get_json()["response_json"] == {"add": {}}


def test_a_stored_rate_limit_beyond_the_bounds_falls_back_to_the_global_one(make_app, upstream):
    """A policy stored before the bounds existed must not stop the registry from loading."""
    app = make_app(GATEWAY_RATE_LIMIT="2/minute")
    client = app.test_client()
    client.post("/register_service", data=f"svc,{UPSTREAM}")
    upstream.add(responses.GET, f"{UPSTREAM}/", json={})
    registry = app.extensions["gateway"].registry
    stored = {**put_policy(client, {"auth": "none"}).get_json(),
              "rate_limit": "9" * 400 + "/second"}
    registry.put_policy("svc", stored)  # straight to the store, as an old gateway did
    assert [client.get("/svc").status_code for _ in range(3)] == [200, 200, 429]
    assert client.get("/svc").headers["RateLimit-Limit"] == "2"


@pytest.mark.parametrize("json_add", [
    {"x": float("nan")}, {"x": [float("inf")]}, {"x": "\ud800"}, {"\udc00": 1}, {"x": 2**60},
    {"x": {1, 2}}, {"x": 1j}, {"x": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]},
])
def test_validate_policy_bounds_json_add_built_in_python(json_add):
    with pytest.raises(BadRequest, match="response_json.add"):
        validate_policy({"response_json": {"add": json_add}})


@pytest.mark.parametrize("doc", [
    {"connect_timeout": 10**400}, {"read_timeout": -(10**400)}, {"read_timeout": float("nan")},
    {"health_check": {"interval": 10**400}}, {"health_check": {"timeout": float("nan")}},
    {"rate_limit": "9" * 400 + "/hour"},
])
def test_validate_policy_bounds_numbers_built_in_python(doc):
    with pytest.raises(BadRequest):
        validate_policy(doc)


def test_json_add_within_bounds_is_kept():
    deep: list = []
    for _ in range(MAX_JSON_ADD_DEPTH - 2):
        deep = [deep]
    add = {"n": 2**53 - 1, "f": -1.5e300, "s": "\u00e9", "deep": deep}
    assert validate_policy({"response_json": {"add": add}})["response_json"] == {"add": add}


def test_policy_bodies_that_are_not_json_are_400(client):
    response = client.put("/_gateway/services/svc/policy", data="auth=none")
    assert response.status_code == 400
    assert client.put("/_gateway/services/_gateway/policy", json={}).status_code == 400


def test_policy_api_needs_admin_rights(make_app):
    client = make_app().test_client()
    outside = {"REMOTE_ADDR": "203.0.113.7"}
    assert client.put("/_gateway/services/svc/policy", json={},
                      environ_base=outside).status_code == 401
    assert client.get("/_gateway/services/svc/policy", environ_base=outside).status_code == 401
    assert client.get("/_gateway/services/svc/policy").status_code == 404  # nothing was stored


# -- what policies do ------------------------------------------------------------------------


def test_seed_transformations(client, upstream, auth):
    put_policy(client, SEED_POLICY)
    upstream.add(responses.GET, f"{UPSTREAM}/hello",
                 json={"message": "Hello from the Service!"})
    response = client.get("/svc/hello", headers=auth)
    assert sent_headers(upstream)["X-Custom-Header"] == "My API Gateway"
    assert response.headers["X-Custom-Header"] == "My API Gateway"
    assert response.get_json() == {"message": "Hello from the Service!",
                                   "custom": "This is a custom message"}
    assert int(response.headers["Content-Length"]) == len(response.data)


def test_header_removal_both_ways(client, upstream, auth):
    put_policy(client, {"request_headers": {"remove": ["Authorization", "X-Debug"]},
                        "response_headers": {"remove": ["X-Powered-By"]}})
    upstream.add(responses.GET, f"{UPSTREAM}/", body="ok",
                 headers={"X-Powered-By": "PHP", "X-Other": "1"})
    response = client.get("/svc", headers={**auth, "X-Debug": "1", "X-Keep": "1"})
    headers = sent_headers(upstream)
    assert "Authorization" not in headers and "X-Debug" not in headers
    assert headers["X-Keep"] == "1"
    assert "X-Powered-By" not in response.headers and response.headers["X-Other"] == "1"


@pytest.mark.parametrize("content_type, body, headers", [
    ("text/plain", b'{"a": 1}', {}),
    ("application/json", b"not json at all", {}),
    ("application/json", b"[1, 2, 3]", {}),
    ("application/json", gzip.compress(b'{"a": 1}', mtime=0), {"Content-Encoding": "gzip"}),
    ("application/json", b'{"pad": "' + b"x" * (1024 * 1024) + b'"}', {}),
    ("application/json", b'{"deep": ' + b"[" * 100000 + b"]" * 100000 + b"}", {}),  # a 500 once
    ("application/json", b'{"lone": "\\ud800"}', {}),  # a 500 once: not writable as UTF-8
])
def test_bodies_that_cannot_take_fields_pass_through_unchanged(client, upstream, auth,
                                                               content_type, body, headers):
    put_policy(client, SEED_POLICY)
    upstream.add(responses.GET, f"{UPSTREAM}/b", body=body, content_type=content_type,
                 headers=headers)
    response = client.get("/svc/b", headers=auth)
    assert response.status_code == 200
    assert response.data == body


def test_json_fields_on_problem_json_and_errors(client, upstream, auth):
    put_policy(client, SEED_POLICY)
    upstream.add(responses.GET, f"{UPSTREAM}/e", status=404,
                 body=json.dumps({"title": "nope"}), content_type="application/problem+json")
    response = client.get("/svc/e", headers=auth)
    assert response.status_code == 404
    assert response.get_json(force=True) == {"title": "nope",
                                             "custom": "This is a custom message"}


def test_auth_none_makes_a_service_public(client, upstream):
    upstream.add(responses.GET, f"{UPSTREAM}/", body="public")
    assert client.get("/svc").status_code == 401
    put_policy(client, {"auth": "none"})
    response = client.get("/svc")
    assert response.status_code == 200 and response.data == b"public"
    assert "X-Authenticated-Subject" not in sent_headers(upstream)


def test_strip_prefix_false_keeps_the_service_name(client, upstream, auth):
    put_policy(client, {"strip_prefix": False})
    upstream.add(responses.GET, f"{UPSTREAM}/svc/items?x=1", body="ok")
    assert client.get("/svc/items?x=1", headers=auth).status_code == 200
    assert upstream.calls[-1].request.target == "/svc/items?x=1"


def test_per_service_timeouts(client, upstream, auth):
    put_policy(client, {"connect_timeout": 0.5, "read_timeout": 7})
    upstream.add(responses.GET, f"{UPSTREAM}/", body="ok")
    client.get("/svc", headers=auth)
    assert upstream.calls[-1].request.req_kwargs["timeout"] == (0.5, 7.0)
