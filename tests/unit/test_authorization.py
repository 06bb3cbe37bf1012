"""Per-service authorization and claims to headers (issue 15, sections 2 and 3)."""

from __future__ import annotations

import pytest
import responses
from requests.structures import CaseInsensitiveDict

from gateway_app.authorization import (
    MAX_CLAIM_HEADER_CHARS,
    Requirement,
    header_value,
    token_scopes,
)
from gateway_app.errors import BadRequest
from gateway_app.policies import validate_policy
from tests.conftest import make_token

UPSTREAM = "http://upstream.test:9000"


@pytest.fixture
def client(make_app, upstream):
    upstream.add(responses.GET, f"{UPSTREAM}/", json={"ok": True})
    client = make_app().test_client()
    client.post("/register_service", data=f"svc,{UPSTREAM}")
    return client


def put_policy(client, doc, name="svc"):
    return client.put(f"/_gateway/services/{name}/policy", json=doc)


def call(client, headers=None, **claims):
    token = make_token(**claims)
    return client.get("/svc", headers={"Authorization": f"Bearer {token}", **(headers or {})})


def sent(upstream):
    return CaseInsensitiveDict(upstream.calls[-1].request.headers)


# -- require ---------------------------------------------------------------------------------


def test_scopes_from_scope_or_scp():
    assert token_scopes({"scope": "a b  c"}) == {"a", "b", "c"}
    assert token_scopes({"scp": ["a", "b", 3]}) == {"a", "b"}
    assert token_scopes({"scp": "User.Read Mail.Read"}) == {"User.Read", "Mail.Read"}  # Entra
    assert token_scopes({"scope": "a", "scp": ["b"]}) == {"a", "b"}
    assert token_scopes({"scope": 7}) == set()


def test_required_scopes_are_all_of(client, upstream):
    assert put_policy(client, {"require": {"scopes": ["orders:read", "orders:write"]}}) \
        .status_code == 201
    assert call(client, scope="orders:read orders:write openid").status_code == 200
    assert call(client, scp=["orders:write", "orders:read"]).status_code == 200
    refused = call(client, scope="orders:read")
    assert refused.status_code == 403
    assert refused.get_json()["error"] == "forbidden"
    assert "orders:write" in refused.get_json()["message"]
    assert refused.headers["WWW-Authenticate"] == (
        'Bearer realm="gateway", error="insufficient_scope", scope="orders:read orders:write"')
    assert len(upstream.calls) == 2  # the refused one never went up


def test_required_claims_are_any_of_values_and_all_of_claims(client, upstream):
    put_policy(client, {"require": {"claims": {"role": ["admin", "ops"], "tenant": ["t1"]}}})
    assert call(client, role="ops", tenant="t1").status_code == 200
    assert call(client, role=["viewer", "admin"], tenant="t1").status_code == 200
    for claims in ({"role": "viewer", "tenant": "t1"}, {"role": "admin"},
                   {"role": ["viewer"], "tenant": "t1"}, {"role": {"admin": 1}, "tenant": "t1"},
                   {}):
        refused = call(client, **claims)
        assert refused.status_code == 403, claims
        assert refused.headers["WWW-Authenticate"] == \
            'Bearer realm="gateway", error="insufficient_scope"'
    assert len(upstream.calls) == 2


def test_claim_values_compare_as_json():
    requirement = Requirement.compile({"claims": {"level": [1], "admin": [True]}})
    assert requirement.refusal({"level": 1, "admin": True}) is None
    assert requirement.refusal({"level": 1.0, "admin": True}) is None
    assert requirement.refusal({"level": True, "admin": True}) is not None  # true is not 1
    assert requirement.refusal({"level": 1, "admin": 1}) is not None
    assert requirement.refusal({"level": "1", "admin": True}) is not None


def test_nested_and_namespaced_claims(client, upstream):
    put_policy(client, {"require": {"claims": {"realm_access.roles": ["gateway-user"],
                                               "https://example.com/tier": ["gold"]}}})
    ok = call(client, realm_access={"roles": ["offline", "gateway-user"]},
              **{"https://example.com/tier": "gold"})
    assert ok.status_code == 200
    assert call(client, realm_access={"roles": ["offline"]},
                **{"https://example.com/tier": "gold"}).status_code == 403
    assert call(client, **{"realm_access.roles": "gateway-user",
                           "https://example.com/tier": "gold"}).status_code == 200


def test_forbidden_comes_after_the_token_and_before_the_registry(client, upstream):
    put_policy(client, {"require": {"scopes": ["x"]}}, name="ghost")  # a policy, no service
    assert client.get("/ghost").status_code == 401
    assert call(client, scope="y").status_code == 200  # another service: no requirement
    token = make_token(scope="y")
    assert client.get("/ghost", headers={"Authorization": token}).status_code == 403
    token = make_token(scope="x")
    assert client.get("/ghost", headers={"Authorization": token}).status_code == 404


@pytest.mark.parametrize("require, message", [
    ("admin", "must be an object"),
    ({"scopes": "a b"}, "require.scopes"),
    ({"scopes": ["a b"]}, "require.scopes"),
    ({"scopes": ['a"b']}, "require.scopes"),
    ({"scopes": ["x"] * 33}, "require.scopes"),
    ({"scopes": [1]}, "require.scopes"),
    ({"roles": ["x"]}, "must be an object"),
    ({"claims": ["role"]}, "require.claims"),
    ({"claims": {"role": "admin"}}, "list of 1 to"),
    ({"claims": {"role": []}}, "list of 1 to"),
    ({"claims": {"role": [{"a": 1}]}}, "values are"),
    ({"claims": {"role": [None]}}, "values are"),
    ({"claims": {"role": ["x" * 300]}}, "values are"),
    ({"claims": {"": ["x"]}}, "claim names"),
    ({"claims": {"a\nb": ["x"]}}, "claim names"),
    ({"claims": {f"c{i}": ["x"] for i in range(17)}}, "at most 16"),
    ({"claims": {"a.b.c.d.e.f.g.h.i": ["x"]}}, "parts"),
])
def test_a_malformed_require_is_400_and_changes_nothing(client, upstream, require, message):
    assert put_policy(client, {"rate_limit": "5/second"}).status_code == 201
    response = put_policy(client, {"require": require})
    assert response.status_code == 400
    assert message in response.get_json()["message"]
    assert client.get("/_gateway/services/svc/policy").get_json()["rate_limit"] == "5/second"
    assert call(client).status_code == 200


def test_require_needs_a_token():
    with pytest.raises(BadRequest, match="cannot go with auth 'none'"):
        validate_policy({"auth": "none", "require": {"scopes": ["a"]}})


def test_an_empty_require_requires_nothing(client):
    assert put_policy(client, {"require": {}}).status_code == 201
    assert call(client).status_code == 200


# -- claims_to_headers ---------------------------------------------------------------------


def test_claims_become_headers_and_client_copies_are_dropped(client, upstream):
    put_policy(client, {"claims_to_headers": {"email": "X-User-Email", "tenant": "X-Tenant",
                                              "age": "X-Age", "org.id": "X-Org"}})
    call(client, headers={"X-User-Email": "forged@evil", "x-tenant": "forged"},
         email="a@example.com", tenant="t1", age=42, org={"id": 7})
    headers = sent(upstream)
    assert headers["X-User-Email"] == "a@example.com"
    assert headers["X-Tenant"] == "t1"
    assert headers["X-Age"] == "42"
    assert headers["X-Org"] == "7"
    assert "forged" not in str(upstream.calls[-1].request.headers)


def test_a_missing_or_unpassable_claim_means_no_header(client, upstream):
    put_policy(client, {"claims_to_headers": {"email": "X-User-Email", "groups": "X-Groups",
                                              "flag": "X-Flag", "note": "X-Note"}})
    call(client, headers={"X-User-Email": "forged@evil", "X-Groups": "admins"},
         groups=["admins"], flag=True, note="line\r\nX-Injected: 1")
    headers = sent(upstream)
    for name in ("X-User-Email", "X-Groups", "X-Flag", "X-Note", "X-Injected"):
        assert name not in headers


def test_header_values_are_bounded():
    assert header_value("x" * MAX_CLAIM_HEADER_CHARS) is not None
    assert header_value("x" * (MAX_CLAIM_HEADER_CHARS + 1)) is None
    assert header_value("a\rb") is None and header_value("a\nb") is None
    assert header_value("José") is None
    assert header_value("") is None
    assert header_value(1.5) == "1.5" and header_value(2**60) is None
    assert header_value(float("nan")) is None and header_value(None) is None


@pytest.mark.parametrize("mapping, message", [
    ({"sub": "X-Forwarded-For"}, "set by the gateway"),
    ({"sub": "Authorization"}, "set by the gateway"),
    ({"sub": "x-authenticated-subject"}, "set by the gateway"),
    ({"sub": "Connection"}, "set by the gateway"),
    ({"sub": "Host"}, "set by the gateway"),
    ({"sub": "X-A", "email": "x-a"}, "target of two claims"),
    ({"sub": "Bad Header"}, "not a valid header name"),
    ({"sub": 5}, "not a valid header name"),
    ({"": "X-A"}, "claim names"),
    ({f"c{i}": f"X-{i}" for i in range(17)}, "at most 16"),
    (["email"], "must be an object"),
])
def test_a_malformed_claims_to_headers_is_400(client, mapping, message):
    response = put_policy(client, {"claims_to_headers": mapping})
    assert response.status_code == 400
    assert message in response.get_json()["message"]
    assert client.get("/_gateway/services/svc/policy").status_code == 404


def test_claim_headers_and_request_headers_do_not_overlap():
    with pytest.raises(BadRequest, match="also in request_headers"):
        validate_policy({"claims_to_headers": {"email": "X-Email"},
                         "request_headers": {"remove": ["x-email"]}})
    with pytest.raises(BadRequest, match="cannot go with auth 'none'"):
        validate_policy({"auth": "none", "claims_to_headers": {"email": "X-Email"}})


def test_policies_stored_before_these_fields_still_load(client, upstream):
    stored = validate_policy({})
    del stored["require"], stored["claims_to_headers"]
    from gateway_app.policies import compile_policy

    policy = compile_policy(stored)
    assert policy.require is None and policy.claim_headers is None
