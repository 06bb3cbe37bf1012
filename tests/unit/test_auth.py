"""JWT checks on proxied requests (README: Proxying)."""

import base64
import json
import time
from collections import OrderedDict

import jwt
import pytest
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway_app.auth import MAX_NUMERIC_DATE, InvalidToken, TokenVerifier
from gateway_app.config import load_settings
from tests.conftest import SECRET, make_token

UPSTREAM = "http://upstream.test:9000"


@pytest.fixture
def upstream(upstream):
    upstream.add(responses.GET, f"{UPSTREAM}/", json={"ok": True})
    return upstream


@pytest.fixture
def gw(make_app):
    def build(**overrides):
        client = make_app(**overrides).test_client()
        client.post("/register_service", data=f"svc,{UPSTREAM}")
        return client
    return build


def call(client, authorization=None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    return client.get("/svc", headers=headers)


def test_bearer_and_bare_tokens_are_accepted(gw, upstream):
    client = gw()
    token = make_token()
    assert call(client, f"Bearer {token}").status_code == 200
    assert call(client, token).status_code == 200  # the seed's client sends it bare
    assert call(client, f"bearer {token}").status_code == 200


def test_missing_token_is_401_with_challenge_and_upstream_untouched(gw, upstream):
    response = call(gw())
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert response.get_json()["error"] == "unauthorized"
    assert len(upstream.calls) == 0


def _unsigned(claims):
    def b64(doc):
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


@pytest.mark.parametrize("make", [
    lambda: make_token(secret="another-secret-of-sufficient-length-0123456"),
    lambda: make_token(ttl=-10),
    lambda: make_token(nbf=int(time.time()) + 600),
    lambda: jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"),  # no exp
    lambda: make_token(algorithm="HS512"),  # not allowed by default
    lambda: _unsigned({"sub": "a", "exp": int(time.time()) + 60}),
    lambda: "not.a.token",
    lambda: "Basic dXNlcjpwYXNz",
    lambda: make_token(sub="evil\r\nX-Injected: 1"),
    lambda: make_token(exp="tomorrow"),
    lambda: "x" * 9000,
])
def test_invalid_tokens_are_401_invalid_token(gw, upstream, make):
    response = call(gw(), make())
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    assert len(upstream.calls) == 0


SOON = int(time.time()) + 300


@pytest.mark.parametrize("claims", [
    {"exp": 1e308},  # was accepted, and cached "forever"
    {"exp": 10**400},  # was a 500: float() of it overflows
    {"exp": 253402300800},  # a second after 9999-12-31T23:59:59Z
    {"exp": float("inf")},
    {"exp": float("nan")},
    {"exp": SOON, "nbf": float("-inf")},
    {"exp": SOON, "nbf": -1e308},
    {"exp": SOON, "nbf": False},
    {"exp": SOON, "iat": True},
    {"exp": SOON, "iat": 1e308},
    {"exp": SOON, "iat": "0"},  # PyJWT reads it with int()
    {"exp": SOON, "nbf": [0]},
])
def test_time_claims_must_be_finite_numbers_before_the_year_10000(gw, upstream, claims):
    token = jwt.encode({"sub": "a", **claims}, SECRET, algorithm="HS256")
    response = call(gw(), token)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    assert len(upstream.calls) == 0


def test_time_claims_up_to_the_year_9999_are_accepted(gw, upstream):
    token = jwt.encode({"sub": "a", "exp": MAX_NUMERIC_DATE, "iat": SOON - 300, "nbf": 0.5},
                       SECRET, algorithm="HS256")
    assert call(gw(), token).status_code == 200


def test_token_in_query_string_is_not_accepted(gw, upstream):
    response = gw().get(f"/svc?access_token={make_token()}")
    assert response.status_code == 401


def test_issuer_and_audience_are_checked_when_configured(gw, upstream):
    client = gw(GATEWAY_JWT_ISSUER="my_issuer", GATEWAY_JWT_AUDIENCE="gw")
    assert call(client, make_token(iss="my_issuer", aud="gw")).status_code == 200
    assert call(client, make_token(iss="other", aud="gw")).status_code == 401
    assert call(client, make_token(iss="my_issuer", aud="other")).status_code == 401
    assert call(client, make_token(aud="gw")).status_code == 401  # iss missing


def test_audience_claim_is_ignored_when_not_configured(gw, upstream):
    assert call(gw(), make_token(aud="anything")).status_code == 200


def test_leeway_allows_small_clock_skew(gw, upstream):
    skewed = make_token(ttl=-5)
    assert call(gw(), skewed).status_code == 401
    assert call(gw(GATEWAY_JWT_LEEWAY=30), skewed).status_code == 200


def test_seed_secret_still_works(gw, upstream, caplog):
    client = gw(GATEWAY_JWT_SECRET="secret_key", GATEWAY_JWT_ISSUER="my_issuer")
    assert "use at least 32" in caplog.text
    token = jwt.encode({"sub": "1234567890", "iss": "my_issuer",
                        "exp": int(time.time()) + 3600}, "secret_key", algorithm="HS256")
    assert call(client, token).status_code == 200


@pytest.fixture
def rsa_keys(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(public)
    return key, public, tmp_path / "pub.pem"


def test_rs256_with_public_key_file(gw, upstream, rsa_keys):
    key, public, path = rsa_keys
    client = gw(GATEWAY_JWT_ALGORITHMS="RS256", GATEWAY_JWT_PUBLIC_KEY_FILE=path)
    good = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, key, algorithm="RS256")
    assert call(client, good).status_code == 200
    # HS/RS confusion: an HMAC token keyed with the public key's PEM text must not verify.
    forged_header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    import hashlib
    import hmac
    body = base64.urlsafe_b64encode(
        json.dumps({"sub": "a", "exp": int(time.time()) + 60}).encode()).rstrip(b"=")
    signing_input = forged_header + b"." + body
    sig = base64.urlsafe_b64encode(
        hmac.new(public, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    forged = (signing_input + b"." + sig).decode()
    assert call(client, forged).status_code == 401
    assert len(upstream.calls) == 1


def test_es256_with_public_key_file(gw, upstream, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    client = gw(GATEWAY_JWT_ALGORITHMS="ES256", GATEWAY_JWT_PUBLIC_KEY_FILE=path)
    good = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    assert call(client, good).status_code == 200
    assert call(client, make_token()).status_code == 401  # HS256 not in the allow-list


def test_cache_never_outlives_exp(monkeypatch):
    settings = load_settings({"GATEWAY_JWT_SECRET": SECRET})
    verifier = TokenVerifier(settings, SECRET.encode())
    decoded = []
    real_decode = verifier._decode
    monkeypatch.setattr(verifier, "_decode", lambda t: decoded.append(t) or real_decode(t))
    now = time.time()
    token = make_token(ttl=10)
    assert verifier.verify(token)["sub"] == "alice"
    assert verifier.verify(token)["sub"] == "alice"
    assert len(decoded) == 1  # the second check was a cache hit
    monkeypatch.setattr(time, "time", lambda: now + 11)
    verifier.verify(token)  # PyJWT's own clock still says valid; ours says: check again
    assert len(decoded) == 2


class CountingCache(OrderedDict):
    """An OrderedDict that counts passes over its entries and evictions."""

    def __init__(self) -> None:
        super().__init__()
        self.scans = self.evictions = 0

    def __iter__(self):
        self.scans += 1
        return super().__iter__()

    def keys(self):
        self.scans += 1
        return super().keys()

    def values(self):
        self.scans += 1
        return super().values()

    def items(self):
        self.scans += 1
        return super().items()

    def popitem(self, last=True):
        self.evictions += 1
        return super().popitem(last)


def test_a_full_cache_evicts_its_oldest_entry_without_a_scan(monkeypatch):
    """Eviction is O(1): one entry out per entry in, never a pass over the cache."""
    import gateway_app.auth as auth

    monkeypatch.setattr(auth, "CACHE_SIZE", 50)
    monkeypatch.setattr(auth, "OrderedDict", CountingCache)
    verifier = TokenVerifier(load_settings({}), SECRET.encode())
    tokens = [make_token(sub=f"user{i}") for i in range(80)]
    for t in tokens[:50]:
        verifier.verify(t)
    cache = verifier._cache
    assert isinstance(cache, CountingCache) and cache.evictions == 0
    for t in tokens[50:]:
        verifier.verify(t)
    assert (cache.scans, cache.evictions) == (0, 30)
    assert list(cache) == tokens[30:]  # the oldest went first


def test_cache_is_bounded_in_bytes_as_well_as_entries(monkeypatch):
    import gateway_app.auth as auth

    verifier = TokenVerifier(load_settings({}), SECRET.encode())
    small = [make_token(sub=f"user{i}") for i in range(auth.CACHE_SIZE + 100)]
    for t in small:
        verifier.verify(t)
    assert len(verifier._cache) == auth.CACHE_SIZE
    assert verifier._cache_bytes == sum(auth._entry_cost(t) for t in verifier._cache)
    assert verifier._cache_bytes <= auth.CACHE_BYTES

    big = [make_token(sub=f"big{i:04d}", groups="g" * 5800) for i in range(1500)]  # 7.8 KB
    fit = auth.CACHE_BYTES // auth._entry_cost(big[0])
    assert fit < 1500
    for t in big:
        verifier.verify(t)
    assert verifier._cache_bytes <= auth.CACHE_BYTES
    assert verifier._cache_bytes == sum(auth._entry_cost(t) for t in verifier._cache)
    kept = [claims["sub"] for claims, _ in verifier._cache.values()]
    assert kept == [f"big{i:04d}" for i in range(1500 - fit, 1500)]  # as many as fit, newest


def test_an_expired_entry_is_dropped_when_found(monkeypatch):
    verifier = TokenVerifier(load_settings({}), SECRET.encode())
    token = make_token(ttl=10)
    verifier.verify(token)
    assert token in verifier._cache
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 11)

    def refuse(token):
        raise InvalidToken("expired")

    monkeypatch.setattr(verifier, "_decode", refuse)
    with pytest.raises(InvalidToken):
        verifier.verify(token)
    assert token not in verifier._cache and verifier._cache_bytes == 0


def test_cache_is_bounded(monkeypatch):
    import gateway_app.auth as auth

    monkeypatch.setattr(auth, "CACHE_SIZE", 5)
    verifier = TokenVerifier(load_settings({}), SECRET.encode())
    tokens = [make_token(sub=f"user{i}") for i in range(20)]
    for t in tokens:
        verifier.verify(t)
    assert len(verifier._cache) <= 5
    assert verifier.verify(tokens[0])["sub"] == "user0"  # evicted ones still verify
