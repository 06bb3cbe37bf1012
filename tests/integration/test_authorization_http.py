"""Per-service authorization and claims to headers over real gunicorn with several workers,
with tokens from a real provider on loopback (issue 15, sections 2 and 3)."""

from __future__ import annotations

import requests

from tests.jwks_support import KeyServer


def put_policy(gateway, name, doc):
    return requests.put(f"{gateway.url}/_gateway/services/{name}/policy", json=doc, timeout=5)


def test_scopes_claims_and_claim_headers_over_http(start_gateway, upstream):
    with KeyServer() as idp:
        kid = idp.add_key("RSA")
        gateway = start_gateway(GATEWAY_WORKERS=3, GATEWAY_OIDC_ISSUER=idp.issuer)
        gateway.register("orders", upstream.address)
        assert put_policy(gateway, "orders", {
            "require": {"scopes": ["orders:read"], "claims": {"realm_access.roles": ["staff"]}},
            "claims_to_headers": {"email": "X-User-Email", "tenant": "X-Tenant"},
        }).status_code == 201

        def token(**claims):
            return {"Authorization": f"Bearer {idp.token(kid, iss=idp.issuer, **claims)}"}

        allowed = token(scope="openid orders:read", realm_access={"roles": ["staff"]},
                        email="ann@example.com", tenant="acme")
        lacking = token(scope="openid", realm_access={"roles": ["staff"]})
        # Every worker has the policy: the lacking token is refused by all of them.
        gateway.wait_routable("/orders/", lacking, 403)
        upstream.seen.clear()
        for _ in range(6):
            refused = gateway.fresh_get("/orders/", lacking)
            assert refused.status_code == 403
            assert refused.json()["error"] == "forbidden"
            assert refused.headers["WWW-Authenticate"] == (
                'Bearer realm="gateway", error="insufficient_scope", scope="orders:read"')
        no_role = token(scope="orders:read", realm_access={"roles": ["guest"]})
        assert gateway.fresh_get("/orders/", no_role).status_code == 403
        assert upstream.seen == []  # the upstream was never contacted

        forged = {"X-User-Email": "boss@example.com", "X-Tenant": "other"}
        echoed = gateway.fresh_get("/orders/", {**allowed, **forged}).json()
        assert echoed["headers"]["X-User-Email"] == "ann@example.com"
        assert echoed["headers"]["X-Tenant"] == "acme"
        # A token without the claim: no header, and the client's copy is dropped all the same.
        bare = token(scope="orders:read", realm_access={"roles": ["staff"]})
        echoed = gateway.fresh_get("/orders/", {**bare, **forged}).json()
        assert "X-User-Email" not in echoed["headers"] and "X-Tenant" not in echoed["headers"]

        # A malformed policy is a 400 and the one in force stays.
        bad = put_policy(gateway, "orders", {"require": {"scopes": "orders:read"}})
        assert bad.status_code == 400
        bad = put_policy(gateway, "orders", {"claims_to_headers": {"sub": "X-Forwarded-For"}})
        assert bad.status_code == 400
        assert gateway.fresh_get("/orders/", lacking).status_code == 403
