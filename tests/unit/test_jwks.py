"""Keys from the identity provider (issue 15, section 1), against a real provider on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time

import jwt
import pytest
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import gateway_app.jwks as jwks
from gateway_app.config import ConfigError, load_settings
from gateway_app.jwks import (
    MAX_KEYS,
    ProviderError,
    ProviderKeys,
    ProviderUnavailable,
    fetch_json,
    max_age,
    parse_key_set,
)
from gateway_app.jwks_fetch import MAX_DOCUMENT_BYTES
from tests.conftest import SECRET, make_token
from tests.jwks_support import KeyServer, new_private_key, public_jwk

UPSTREAM = "http://upstream.test:9000"
PUBLIC = frozenset(jwks.PUBLIC_KEY_ALGORITHMS)


@pytest.fixture
def idp():
    with KeyServer() as server:
        yield server


@pytest.fixture
def upstream(upstream):
    upstream.add(responses.GET, f"{UPSTREAM}/", json={"ok": True})
    return upstream


@pytest.fixture
def gw(make_app, idp, upstream):
    def build(**overrides):
        overrides.setdefault("GATEWAY_JWT_JWKS_URL", idp.jwks_url)
        app = make_app(**overrides)
        client = app.test_client()
        client.post("/register_service", data=f"svc,{UPSTREAM}")
        client.provider = app.extensions["gateway"].verifier.provider
        return client
    return build


def call(client, token):
    return client.get("/svc", headers={"Authorization": f"Bearer {token}"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(claims: dict, key: bytes, kid: str | None = None) -> str:
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


# -- algorithms ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RSA", "EC", "OKP"])
def test_rs256_es256_and_eddsa_tokens_verify_with_the_providers_keys(gw, idp, upstream, kind):
    kid = idp.add_key(kind)
    client = gw()
    assert idp.fetch_count() == 1  # fetched before serving
    response = call(client, idp.token(kid))
    assert response.status_code == 200, response.get_json()
    assert upstream.calls[-1].request.headers["X-Authenticated-Subject"] == "alice"
    assert idp.fetch_count() == 1


def test_a_key_verifies_only_the_algorithms_its_type_fits(gw, idp):
    rsa_kid = idp.add_key("RSA")
    ec_kid = idp.add_key("EC")
    client = gw()
    assert call(client, idp.token(rsa_kid, algorithm="PS256")).status_code == 200
    # An EC key named by an RSA token's kid: the key does not fit RS256.
    rsa_signed = idp.token(rsa_kid, header_kid=ec_kid)
    assert call(client, rsa_signed).status_code == 401


def test_a_keys_own_alg_binds_it(gw, idp):
    kid = idp.add_key("RSA", alg="RS256")
    client = gw()
    assert call(client, idp.token(kid)).status_code == 200
    assert call(client, idp.token(kid, algorithm="PS256")).status_code == 401


def test_only_the_allowed_algorithms_pass(gw, idp):
    rsa_kid = idp.add_key("RSA")
    ec_kid = idp.add_key("EC")
    client = gw(GATEWAY_JWT_ALGORITHMS="ES256")
    assert call(client, idp.token(ec_kid)).status_code == 200
    assert call(client, idp.token(rsa_kid)).status_code == 401


def test_no_hs_rs_confusion_through_a_jwk(gw, idp):
    """A token signed with HMAC keyed by the public key's own bytes, naming its kid, and a key
    set that offers a symmetric key: neither verifies, HS256 allowed or not."""
    kid = idp.add_key("RSA")
    client = gw(GATEWAY_JWT_ALGORITHMS="RS256,HS256")  # HS256 with the gateway's own secret
    claims = {"sub": "mallory", "exp": int(time.time()) + 60}
    jwk = idp.jwks()["keys"][0]
    for material in (json.dumps(jwk).encode(), jwk["n"].encode(),
                     jwt.algorithms.RSAAlgorithm.from_jwk(jwk).public_bytes(
                         serialization.Encoding.PEM,
                         serialization.PublicFormat.SubjectPublicKeyInfo)):
        assert call(client, hs256(claims, material, kid)).status_code == 401
    # The gateway's own secret still works for HS256 (the static key, never a JWK).
    assert call(client, make_token()).status_code == 200


def test_symmetric_and_private_keys_in_a_key_set_are_never_used(gw, idp):
    secret = b"an-oct-key-that-a-bad-provider-published-0123"
    good = idp.add_key("RSA")
    private = new_private_key("EC")
    idp.raw_jwks = json.dumps({"keys": [
        {"kty": "oct", "kid": "oct1", "k": _b64(secret), "alg": "HS256"},
        public_jwk("EC", private, kid="priv", d=_b64(b"x" * 32)),
        *idp.jwks()["keys"],
    ]}).encode()
    client = gw(GATEWAY_JWT_ALGORITHMS="RS256,ES256,HS256")
    assert set(client.provider.keys) == {good}
    claims = {"sub": "mallory", "exp": int(time.time()) + 60}
    assert call(client, hs256(claims, secret, "oct1")).status_code == 401


# -- reading key sets ---------------------------------------------------------------------


def test_parse_key_set_skips_what_it_cannot_use_and_says_why():
    rsa_key = new_private_key("RSA")
    small = rsa.generate_private_key(65537, 1024)  # noqa: S505 (the point: refused)
    doc = {"keys": [
        public_jwk("RSA", rsa_key, kid="ok"),
        public_jwk("RSA", rsa_key, kid="enc", use="enc"),
        public_jwk("RSA", rsa_key, kid="ops", key_ops=["encrypt"]),
        public_jwk("RSA", small, kid="small"),
        public_jwk("RSA", rsa_key, kid="hs", alg="HS256"),
        public_jwk("EC", new_private_key("EC"), kid="x" * 300),
        {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "!!"},
        "not an object",
    ]}
    table, skipped = parse_key_set(doc, PUBLIC, "test")
    assert list(table) == ["ok"]
    assert table["ok"][0].algorithms == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    assert len(skipped) == 7
    assert any("under 2048" in s for s in skipped) and any("'sig'" in s for s in skipped)


@pytest.mark.parametrize("doc, message", [
    ({"keys": []}, "no key usable"),
    ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "no key usable"),
    ({"nokeys": 1}, "'keys' list"),
    ([1, 2], "'keys' list"),
    ({"keys": [{"kty": "EC", "crv": "P-256"}] * (MAX_KEYS + 1)}, f"at most {MAX_KEYS}"),
])
def test_unusable_key_sets_are_refused(doc, message):
    with pytest.raises(ProviderError, match=message):
        parse_key_set(doc, PUBLIC, "test")


def test_max_age_from_cache_control():
    assert max_age(None) is None
    assert max_age("public, max-age=3600") == 3600
    assert max_age("max-age=\"120\", must-revalidate") == 120
    assert max_age("no-store") == 0
    assert max_age("private") is None


def test_refresh_interval_follows_cache_control_within_bounds(idp):
    idp.add_key("RSA")
    keys = ProviderKeys(load_settings({"GATEWAY_JWT_JWKS_URL": idp.jwks_url}))
    assert keys._interval(None) == 600
    assert keys._interval(3600) == 3600
    assert keys._interval(1) == jwks.MIN_REFRESH
    assert keys._interval(10**9) == jwks.MAX_REFRESH
    idp.cache_control = "max-age=7200"
    keys._fetch()
    assert 7190 < keys._next_refresh - time.monotonic() <= 7200


# -- fetching, bounded ------------------------------------------------------------------------


def test_a_redirect_is_not_followed(idp):
    idp.add_key("RSA")
    with pytest.raises(ProviderError, match="redirects are not followed"):
        fetch_json(idp.url + "/redirect", 2, None, "the key set")
    assert idp.fetch_count() == 0


def test_a_body_over_one_mebibyte_is_refused(idp):
    with pytest.raises(ProviderError, match=f"over {MAX_DOCUMENT_BYTES} bytes"):
        fetch_json(idp.url + "/big", 5, None, "the key set")


def test_a_slow_provider_is_abandoned_at_the_timeout(idp):
    idp.delay = 3
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="timed out"):
        fetch_json(idp.jwks_url, 0.5, None, "the key set")
    assert time.monotonic() - started < 2


def test_an_address_that_resolves_to_a_refused_one_is_never_connected_to(monkeypatch):
    connected = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 443))])
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connected.append(addr))
    with pytest.raises(ProviderError, match="resolves to no address"):
        fetch_json("https://idp.example/jwks.json", 1, None, "the key set")
    assert connected == []


def test_plain_http_resolving_outside_loopback_is_refused(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 80))])
    with pytest.raises(ProviderError, match="loopback only"):
        fetch_json("http://localhost/jwks.json", 1, None, "the key set")


@pytest.mark.parametrize("env, message", [
    ({"GATEWAY_JWT_JWKS_URL": "http://idp.example.com/jwks"}, "loopback address only"),
    ({"GATEWAY_JWT_JWKS_URL": "ftp://idp.example.com/jwks"}, "https URL"),
    ({"GATEWAY_JWT_JWKS_URL": "https://169.254.169.254/jwks"}, "link-local"),
    ({"GATEWAY_JWT_JWKS_URL": "https://user:pw@idp.example.com/jwks"}, "user information"),
    ({"GATEWAY_OIDC_ISSUER": "https://idp.example.com/?x=1"}, "query"),
    ({"GATEWAY_OIDC_ISSUER": "https://a", "GATEWAY_JWT_JWKS_URL": "https://b"}, "not both"),
    ({"GATEWAY_JWT_JWKS_URL": "https://a", "GATEWAY_JWT_ALGORITHMS": "HS256"},
     "need a public-key algorithm"),
])
def test_provider_settings_are_checked(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_provider_settings_defaults():
    settings = load_settings({"GATEWAY_OIDC_ISSUER": "https://idp.example.com/realms/x"})
    assert "RS256" in settings.jwt_algorithms and "HS256" not in settings.jwt_algorithms
    assert (settings.jwks_refresh, settings.jwks_cooldown) == (600, 30)
    assert settings.jwt_public_key_file is None  # no PEM file needed
    assert load_settings({}).jwt_algorithms == ("HS256",)  # the seed, unchanged


# -- rotation, outages, unknown kids -----------------------------------------------------------


def test_rotation_a_new_kid_is_accepted_after_one_fetch(gw, idp):
    old = idp.add_key("RSA")
    client = gw()
    assert call(client, idp.token(old)).status_code == 200
    new = idp.add_key("EC")
    assert idp.fetch_count() == 1
    assert call(client, idp.token(new)).status_code == 200
    assert idp.fetch_count() == 2
    assert call(client, idp.token(new, sub="bob")).status_code == 200
    assert idp.fetch_count() == 2


def test_rotation_a_removed_key_stops_working_after_the_next_refresh(gw, idp):
    old = idp.add_key("RSA")
    keep = idp.add_key("EC")
    client = gw()
    token = idp.token(old)
    assert call(client, token).status_code == 200  # now cached as verified
    idp.publish(old, False)
    assert call(client, token).status_code == 200  # until the next refresh
    client.provider._fetch()  # the refresh
    assert call(client, token).status_code == 401
    assert call(client, idp.token(old, sub="new")).status_code == 401
    assert call(client, idp.token(keep)).status_code == 200


def test_the_background_refresh_runs_on_its_own(gw, idp):
    old = idp.add_key("RSA")
    idp.add_key("EC")  # a set is never emptied: one key stays
    client = gw(GATEWAY_JWKS_REFRESH=1)
    token = idp.token(old)
    assert call(client, token).status_code == 200
    idp.publish(old, False)
    deadline = time.monotonic() + 10
    while call(client, token).status_code == 200:
        assert time.monotonic() < deadline, "the removed key still verifies"
        time.sleep(0.1)
    assert idp.fetch_count() >= 2


def test_provider_down_stale_keys_keep_working(gw, idp):
    kid = idp.add_key("RSA")
    client = gw()
    idp.down = True
    with pytest.raises(ProviderUnavailable):
        client.provider._fetch()
    idp.jwks_status = 500
    idp.down = False
    with pytest.raises(ProviderUnavailable):
        client.provider._fetch()
    idp.jwks_status, idp.raw_jwks = 200, b"<html>oops</html>"
    with pytest.raises(ProviderError):
        client.provider._fetch()
    idp.raw_jwks = b'{"keys": []}'
    with pytest.raises(ProviderError):
        client.provider._fetch()
    assert call(client, idp.token(kid, sub="fresh")).status_code == 200


def test_a_gateway_started_while_the_provider_is_down_starts_and_catches_up(gw, idp, caplog):
    kid = idp.add_key("RSA")
    idp.down = True
    client = gw()  # starts: no exception
    assert "tokens are refused" in caplog.text
    response = call(client, idp.token(kid))
    assert response.status_code == 401
    assert "not available" in response.get_json()["message"]
    idp.down = False
    deadline = time.monotonic() + 10  # the retry backoff starts at 1 s
    while call(client, idp.token(kid)).status_code != 200:
        assert time.monotonic() < deadline, "the keys were never picked up"
        time.sleep(0.2)


def test_unknown_kids_fetch_once_per_cooldown(gw, idp):
    idp.add_key("RSA")
    client = gw()
    forger = new_private_key("RSA")
    claims = {"sub": "x", "exp": int(time.time()) + 60}
    for i in range(50):
        forged = jwt.encode(claims, forger, algorithm="RS256", headers={"kid": f"forged-{i}"})
        assert call(client, forged).status_code == 401
    assert idp.fetch_count() == 2  # the start, and one for all the unknown kids


def test_a_storm_of_forged_kids_from_many_threads_is_one_fetch(make_app, idp):
    idp.add_key("RSA")
    idp.delay = 0.3  # the fetch is slow: the threads pile up behind it
    app = make_app(GATEWAY_JWT_JWKS_URL=idp.jwks_url, GATEWAY_AUTH_FAILURE_LIMIT="off")
    verifier = app.extensions["gateway"].verifier
    forger = new_private_key("EC")
    claims = {"sub": "x", "exp": int(time.time()) + 60}
    tokens = [jwt.encode(claims, forger, algorithm="ES256", headers={"kid": f"k{i}"})
              for i in range(1000)]
    before = idp.fetch_count()
    results = []

    def spray(part):
        for token in part:
            try:
                verifier.verify(token)
                results.append("accepted")
            except Exception as exc:  # noqa: BLE001 (counted below)
                results.append(type(exc).__name__)

    threads = [threading.Thread(target=spray, args=(tokens[i::16],)) for i in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("InvalidToken") == 1000
    assert idp.fetch_count() - before == 1
    assert time.monotonic() - started < 5


def test_a_token_without_kid_uses_the_one_key_without_kid(gw, idp):
    kid = idp.add_key("RSA")
    client = gw()
    assert call(client, idp.token(kid, header_kid=None)).status_code == 401  # "token has no kid"
    idp.raw_jwks = json.dumps({"keys": [{k: v for k, v in jwk.items() if k != "kid"}
                                        for jwk in idp.jwks()["keys"]]}).encode()
    client.provider._fetch()
    assert call(client, idp.token(kid, header_kid=None)).status_code == 200


# -- issuers and the PEM and HMAC keys alongside ----------------------------------------------


def test_discovery_and_the_providers_issuer(gw, idp):
    kid = idp.add_key("OKP")
    client = gw(GATEWAY_JWT_JWKS_URL="", GATEWAY_OIDC_ISSUER=idp.issuer)
    assert idp.discoveries == 1
    assert call(client, idp.token(kid, iss=idp.issuer)).status_code == 200
    assert call(client, idp.token(kid, iss="https://elsewhere")).status_code == 401
    assert call(client, idp.token(kid)).status_code == 401  # no iss


def test_hmac_tokens_keep_their_own_issuer_beside_the_provider(gw, idp):
    kid = idp.add_key("RSA")
    client = gw(GATEWAY_JWT_JWKS_URL="", GATEWAY_OIDC_ISSUER=idp.issuer,
                GATEWAY_JWT_ALGORITHMS="HS256,RS256", GATEWAY_JWT_ISSUER="my_issuer")
    assert call(client, make_token(iss="my_issuer")).status_code == 200
    assert call(client, make_token(iss=idp.issuer)).status_code == 401
    assert call(client, idp.token(kid, iss=idp.issuer)).status_code == 200
    assert call(client, idp.token(kid, iss="my_issuer")).status_code == 401


@pytest.mark.parametrize("discovery, message", [
    ({"issuer": "https://other.example", "jwks_uri": "x"}, "names the issuer"),
    ({"issuer": "ISSUER"}, "has no jwks_uri"),
    (b"<html>not json</html>", "is not JSON"),
    ({"issuer": "ISSUER", "jwks_uri": "http://10.0.0.1/jwks"}, "loopback address only"),
])
def test_discovery_failures_are_start_up_errors(make_app, idp, discovery, message):
    idp.add_key("RSA")
    if isinstance(discovery, dict):
        discovery = {k: (idp.issuer if v == "ISSUER" else v) for k, v in discovery.items()}
    idp.discovery = discovery
    with pytest.raises(ConfigError, match=f"GATEWAY_OIDC_ISSUER: .*{message}"):
        make_app(GATEWAY_OIDC_ISSUER=idp.issuer)


def test_a_key_set_with_no_usable_key_is_a_start_up_error(make_app, idp):
    idp.raw_jwks = b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'
    with pytest.raises(ConfigError, match="GATEWAY_JWT_JWKS_URL: .*no key usable"):
        make_app(GATEWAY_JWT_JWKS_URL=idp.jwks_url)


def test_a_pem_key_and_the_provider_together(gw, idp, tmp_path):
    pem_key = new_private_key("RSA")
    path = tmp_path / "pub.pem"
    path.write_bytes(pem_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    kid = idp.add_key("EC")
    client = gw(GATEWAY_JWT_PUBLIC_KEY_FILE=path)
    claims = {"sub": "pem", "exp": int(time.time()) + 60}
    assert call(client, jwt.encode(claims, pem_key, algorithm="RS256")).status_code == 200
    assert call(client, jwt.encode(claims, pem_key, algorithm="RS256",
                                   headers={"kid": "any"})).status_code == 200
    assert call(client, idp.token(kid)).status_code == 200


def test_the_seed_is_unchanged(make_app, upstream):
    client = make_app().test_client()
    client.post("/register_service", data=f"svc,{UPSTREAM}")
    assert client.get("/svc", headers={"Authorization": make_token()}).status_code == 200
    assert make_app().extensions["gateway"].verifier.provider is None
    assert SECRET  # the HMAC secret of the seed's setup


def test_an_unreadable_ca_bundle_is_a_clear_error(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate")
    with pytest.raises(ProviderError, match="cannot set up a connection"):
        fetch_json("https://idp.example/jwks.json", 1, str(bundle), "the key set")


def test_the_refresh_thread_outlives_a_surprise(gw, idp, monkeypatch):
    old = idp.add_key("RSA")
    client = gw(GATEWAY_JWKS_REFRESH=1)
    monkeypatch.setattr(jwks, "parse_key_set", lambda *a: 1 / 0)
    before = idp.fetch_count()
    deadline = time.monotonic() + 10
    while idp.fetch_count() < before + 2:  # it failed once, and went on trying
        assert time.monotonic() < deadline
        time.sleep(0.1)
    monkeypatch.undo()
    new = idp.add_key("EC")
    idp.publish(old, False)
    while call(client, idp.token(new)).status_code != 200:
        assert time.monotonic() < deadline + 10
        time.sleep(0.2)
