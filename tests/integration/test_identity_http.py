"""Keys from the identity provider over HTTP: real gunicorn (several workers) and a real
provider on loopback that counts its fetches (issue 15, section 1)."""

from __future__ import annotations

import concurrent.futures
import time

import jwt
import pytest
import requests

from tests.jwks_support import KeyServer, new_private_key
from tests.support import Gateway, wait_for

WORKERS = 3


@pytest.fixture
def idp():
    with KeyServer() as server:
        yield server


@pytest.fixture
def provider_gateway(start_gateway, upstream, idp):
    def start(**env) -> Gateway:
        env.setdefault("GATEWAY_JWT_JWKS_URL", idp.jwks_url)
        env.setdefault("GATEWAY_WORKERS", str(WORKERS))
        gateway = start_gateway(**env)
        if env["GATEWAY_JWT_JWKS_URL"] == idp.jwks_url and idp.fetch_count():
            # A worker's pid is there before its app (and its first fetch) is: wait for those.
            wait_for(lambda: idp.fetch_count() >= 1 + int(env["GATEWAY_WORKERS"]), 30,
                     what="every worker's first fetch of the keys")
        assert gateway.register("svc", upstream.address).status_code == 201
        return gateway
    return start


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def statuses(gateway: Gateway, token: str, n: int) -> set[int]:
    """The statuses of ``n`` requests on new connections (spread over the workers)."""
    return {gateway.fresh_get("/svc/", bearer(token)).status_code for _ in range(n)}


def test_rs256_es256_eddsa_through_every_worker(provider_gateway, idp):
    kids = [idp.add_key(kind) for kind in ("RSA", "EC", "OKP")]
    gateway = provider_gateway()
    # The master checked the provider once, then each worker fetched before serving.
    assert idp.fetch_count() == 1 + WORKERS
    for kid in kids:
        token = idp.token(kid)
        gateway.wait_routable("/svc/", bearer(token))
        assert statuses(gateway, token, 4 * WORKERS) == {200}
    assert idp.fetch_count() == 1 + WORKERS
    echoed = gateway.fresh_get("/svc/", bearer(idp.token(kids[0], sub="carol"))).json()
    assert echoed["headers"]["X-Authenticated-Subject"] == "carol"


def test_rotation_over_http(provider_gateway, idp):
    old = idp.add_key("RSA")
    gateway = provider_gateway()
    gateway.wait_routable("/svc/", bearer(idp.token(old)))
    start = idp.fetch_count()
    new = idp.add_key("EC")
    assert statuses(gateway, idp.token(new), 6 * WORKERS) == {200}
    # A new kid costs each worker one fetch at most.
    assert idp.fetch_count() - start <= WORKERS


def test_a_removed_key_stops_working_after_the_next_refresh(provider_gateway, idp):
    old = idp.add_key("RSA")
    idp.add_key("EC")
    gateway = provider_gateway(GATEWAY_JWKS_REFRESH=1)
    token = idp.token(old)
    gateway.wait_routable("/svc/", bearer(token))
    idp.publish(old, False)
    wait_for(lambda: statuses(gateway, token, 4 * WORKERS) == {401}, 10,
             what="the removed key to be refused by every worker")


def test_provider_down_stale_keys_keep_working(provider_gateway, idp):
    kid = idp.add_key("RSA")
    idp.add_key("EC")
    gateway = provider_gateway(GATEWAY_JWKS_REFRESH=1)
    gateway.wait_routable("/svc/", bearer(idp.token(kid)))
    idp.down = True
    before = idp.fetch_count()
    wait_for(lambda: idp.fetch_count() >= before + WORKERS, 10,
             what="the workers to try (and fail) a refresh")
    assert statuses(gateway, idp.token(kid, sub="during-outage"), 4 * WORKERS) == {200}
    assert "keeping the last good keys" in gateway.log()


def test_a_gateway_started_while_the_provider_is_down(provider_gateway, idp):
    kid = idp.add_key("RSA")
    idp.down = True
    gateway = provider_gateway()
    assert "cannot be reached; starting anyway" in gateway.log()
    response = gateway.fresh_get("/svc/", bearer(idp.token(kid)))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    assert "tokens are refused" in gateway.log()
    idp.down = False
    # The workers retry 1 s, 2 s, 4 s... after their failure.
    gateway.wait_routable("/svc/", bearer(idp.token(kid)), timeout=20)


def test_a_storm_of_forged_kids_is_counted_at_the_provider(provider_gateway, idp):
    idp.add_key("RSA")
    gateway = provider_gateway(GATEWAY_AUTH_FAILURE_LIMIT="off")
    before = idp.fetch_count()
    forger = new_private_key("RSA")
    claims = {"sub": "x", "exp": int(time.time()) + 60}
    tokens = [jwt.encode(claims, forger, algorithm="RS256", headers={"kid": f"forged-{i}"})
              for i in range(1000)]
    session = requests.Session()

    def send(token: str) -> int:
        return session.get(gateway.url + "/svc/", headers=bearer(token), timeout=30).status_code

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, tokens))
    elapsed = time.monotonic() - started
    assert set(answers) == {401}
    # At most one fetch per worker per cooldown (30 s), however many kids were forged.
    assert idp.fetch_count() - before <= WORKERS, (idp.fetch_count() - before, elapsed)


@pytest.mark.parametrize("discovery, message", [
    ({"issuer": "https://other.example", "jwks_uri": "JWKS"}, "names the issuer"),
    ({"issuer": "ISSUER"}, "has no jwks_uri"),
    (b"this is not json", "is not JSON"),
])
def test_discovery_refusals_stop_the_start_with_a_clear_error(tmp_path, idp, discovery,
                                                               message):
    idp.add_key("RSA")
    if isinstance(discovery, dict):
        discovery = {k: {"ISSUER": idp.issuer, "JWKS": idp.jwks_url}.get(v, v)
                     for k, v in discovery.items()}
    idp.discovery = discovery
    gateway = Gateway(tmp_path / "data", GATEWAY_OIDC_ISSUER=idp.issuer)
    gateway.start(wait=False)
    try:
        assert gateway.proc.wait(60) != 0
    finally:
        gateway.stop()
    log = gateway.log()
    assert "configuration error: GATEWAY_OIDC_ISSUER:" in log
    assert message in log


def test_discovery_over_http(provider_gateway, idp):
    kid = idp.add_key("OKP")
    gateway = provider_gateway(GATEWAY_JWT_JWKS_URL="", GATEWAY_OIDC_ISSUER=idp.issuer)
    token = idp.token(kid, iss=idp.issuer)
    gateway.wait_routable("/svc/", bearer(token))
    assert gateway.fresh_get("/svc/", bearer(idp.token(kid))).status_code == 401  # no iss
