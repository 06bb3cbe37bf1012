"""Registration credentials scoped to services, and the audit log (issue 15, sections 4, 5)."""

from __future__ import annotations

import json
import logging
import time

import jwt
import pytest

from gateway_app import cli
from gateway_app.config import load_settings, read_or_create_registration_key
from gateway_app.credentials import AUDIENCE, RegistrationCredentials
from tests.conftest import SECRET, make_token

FAR = {"REMOTE_ADDR": "10.9.8.7"}  # not in GATEWAY_ADMIN_ALLOW


def far_client(app):
    """A test client calling from outside the admin-allowed networks."""
    client = app.test_client()
    client.environ_base.update(FAR)
    return client


@pytest.fixture
def app(make_app):
    return make_app(GATEWAY_ADMIN_TOKEN="admin-token-0123456789abcdef")


@pytest.fixture
def operator(app):
    return app.test_client()


@pytest.fixture
def far(app):
    """A client outside the admin-allowed networks."""
    return far_client(app)


@pytest.fixture
def audit_lines():
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("gateway.audit")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def mint(operator, services, **fields):
    response = operator.post("/_gateway/registration-tokens",
                             json={"services": services, **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def register(client, name, address, token=None, **fields):
    doc = {"name": name, "address": address, **fields}
    return client.post("/register_service", json=doc, headers=bearer(token) if token else {})


def test_a_credential_registers_renews_drains_and_removes_its_own_services(operator, far):
    minted = mint(operator, ["orders", "billing"], sub="orders-deployer")
    token = minted["token"]
    assert minted["services"] == ["orders", "billing"] and minted["sub"] == "orders-deployer"
    assert register(far, "orders", "http://10.0.0.7:8000").status_code == 401  # no credential
    created = register(far, "orders", "http://10.0.0.7:8000", token, ttl=30)
    assert created.status_code == 201
    instance = created.get_json()["instance"]["id"]
    base = "/_gateway/services/orders"
    assert far.put(f"{base}/instances/{instance}/heartbeat", headers=bearer(token)) \
        .status_code == 200
    assert far.get(base, headers=bearer(token)).status_code == 200
    assert far.put(f"{base}/instances/{instance}/drain", headers=bearer(token)).status_code == 200
    assert far.post("/deregister_service", data="orders,http://10.0.0.7:8000",
                    headers=bearer(token)).status_code == 200
    assert register(far, "billing", "http://10.0.0.8:8000", token).status_code == 201
    assert far.delete("/_gateway/services/billing", headers=bearer(token)).status_code == 200


def test_anything_else_is_403(operator, far):
    register(operator, "other", "http://10.0.0.9:8000")
    token = mint(operator, ["orders"])["token"]
    register(far, "orders", "http://10.0.0.7:8000", token)
    other_id = operator.get("/_gateway/services/other").get_json()["instances"][0]["id"]
    refused = [
        register(far, "other", "http://10.0.0.7:8000", token),
        far.post("/deregister_service", data="other", headers=bearer(token)),
        far.get("/_gateway/services/other", headers=bearer(token)),
        far.delete("/_gateway/services/other", headers=bearer(token)),
        far.put(f"/_gateway/services/other/instances/{other_id}/heartbeat",
                headers=bearer(token)),
        far.delete(f"/_gateway/services/other/instances/{other_id}", headers=bearer(token)),
        far.put("/_gateway/services/orders/policy", json={"auth": "none"},
                headers=bearer(token)),
        far.get("/_gateway/services/orders/policy", headers=bearer(token)),
        far.post("/_gateway/registration-tokens", json={"services": ["other"]},
                 headers=bearer(token)),
        far.delete("/_gateway/registration-tokens/" + "0" * 32, headers=bearer(token)),
        far.get("/_gateway/registration-tokens/revoked", headers=bearer(token)),
    ]
    for response in refused:
        assert response.status_code == 403, (response.request.path, response.get_json())
        assert response.get_json()["error"] == "forbidden"
    # The listing shows its own services only.
    listing = far.get("/_gateway/services", headers=bearer(token)).get_json()
    assert [s["name"] for s in listing["services"]] == ["orders"]
    # Nothing changed.
    assert [s["name"] for s in operator.get("/_gateway/services").get_json()["services"]] \
        == ["orders", "other"]
    assert operator.get("/_gateway/services/orders/policy").status_code == 404


def test_revoked_expired_and_foreign_credentials_are_401(app, operator, far):
    minted = mint(operator, ["orders"])
    token = minted["token"]
    assert register(far, "orders", "http://10.0.0.7:8000", token).status_code == 201
    revoked = operator.delete(f"/_gateway/registration-tokens/{minted['id']}")
    assert revoked.status_code == 200 and revoked.get_json()["revoked"] is True
    assert register(far, "orders", "http://10.0.0.7:8000", token).status_code == 401
    listed = operator.get("/_gateway/registration-tokens/revoked").get_json()["revoked"]
    assert [entry["id"] for entry in listed] == [minted["id"]]
    # Revoking again is harmless; a bad id is a 400.
    assert operator.delete(f"/_gateway/registration-tokens/{minted['id']}").status_code == 200
    assert operator.delete("/_gateway/registration-tokens/nope").status_code == 400

    key = read_or_create_registration_key(app.extensions["gateway"].settings)
    now = int(time.time())
    claims = {"aud": AUDIENCE, "sub": "x", "services": ["orders"], "jti": "a" * 32,
              "iat": now - 100}
    expired = jwt.encode({**claims, "exp": now - 1}, key, algorithm="HS256")
    assert register(far, "orders", "http://10.0.0.7:8000", expired).status_code == 401
    # A client token (the JWT secret) is no registration credential, even with the claims.
    user = jwt.encode({**claims, "exp": now + 60}, SECRET, algorithm="HS256")
    assert register(far, "orders", "http://10.0.0.7:8000", user).status_code == 401
    wrong_audience = jwt.encode({**claims, "aud": "x", "exp": now + 60}, key, algorithm="HS256")
    assert register(far, "orders", "http://10.0.0.7:8000", wrong_audience).status_code == 401


def test_a_registration_credential_is_no_token_for_services(operator):
    token = mint(operator, ["orders"])["token"]
    register(operator, "orders", "http://10.0.0.7:8000")
    assert operator.get("/orders", headers=bearer(token)).status_code == 401


def test_a_revocation_reaches_another_worker_within_a_second(make_app, tmp_path):
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    one = make_app(GATEWAY_STORE=store)
    two = make_app(GATEWAY_STORE=store)
    minted = mint(one.test_client(), ["orders"])
    far_two = far_client(two)
    assert register(far_two, "orders", "http://10.0.0.7:8000", minted["token"]).status_code \
        == 201
    assert one.test_client().delete(
        f"/_gateway/registration-tokens/{minted['id']}").status_code == 200
    revoked_at = time.monotonic()
    while register(far_two, "orders", "http://10.0.0.7:8000", minted["token"]).status_code \
            != 401:
        assert time.monotonic() - revoked_at < 1.0
        time.sleep(0.02)


def test_rotating_the_key_revokes_every_credential(make_app, tmp_path):
    key_file = tmp_path / "registration-key"
    key_file.write_text("first-key-0123456789abcdef0123456789abcdef\n")
    app = make_app(GATEWAY_REGISTRATION_KEY_FILE=key_file)
    token = mint(app.test_client(), ["orders"])["token"]
    far = far_client(app)
    assert register(far, "orders", "http://10.0.0.7:8000", token).status_code == 201
    key_file.write_text("second-key-0123456789abcdef0123456789abcdef\n")
    rotated = far_client(make_app(GATEWAY_REGISTRATION_KEY_FILE=key_file))
    assert register(rotated, "orders", "http://10.0.0.7:8000", token).status_code == 401


def test_the_seed_registers_from_loopback_without_credentials(operator):
    assert operator.post("/register_service", data="hello_service,http://localhost:9090") \
        .status_code == 201


@pytest.mark.parametrize("doc", [
    {"services": []}, {"services": ["_gateway"]}, {"services": ["a b"]},
    {"services": ["x"], "ttl": 0}, {"services": ["x"], "ttl": 10**9},
    {"services": ["x"], "ttl": True}, {"services": ["x"], "sub": "a\nb"},
    {"services": ["x"], "extra": 1}, {"services": [f"s{i}" for i in range(33)]},
])
def test_bad_mint_requests_are_400(operator, doc):
    assert operator.post("/_gateway/registration-tokens", json=doc).status_code == 400


def test_the_cli_mints_credentials_the_gateway_accepts(app, far, monkeypatch, capsys):
    settings = app.extensions["gateway"].settings
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(settings.data_dir))
    assert cli.main(["token", "--register", "orders,billing", "--ttl", "600"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["services"] == ["orders", "billing"] and claims["exp"] - claims["iat"] == 600
    assert register(far, "billing", "http://10.0.0.7:8000", token).status_code == 201
    assert cli.main(["token", "--register", "bad name"]) == 1
    assert cli.main(["token"]) == 1  # neither --sub nor --register
    assert "needs --sub" in capsys.readouterr().err


def test_every_write_is_audited_without_secrets(operator, far, audit_lines):
    minted = mint(operator, ["orders"], sub="deployer")
    token = minted["token"]
    register(far, "orders", "http://10.0.0.7:8000", token)
    register(far, "other", "http://10.0.0.7:8000", token)
    register(far, "orders", "http://10.0.0.7:8000", "forged.token.value")
    operator.put("/_gateway/services/orders/policy", json={"rate_limit": "5/second"},
                 headers=bearer("admin-token-0123456789abcdef"),
                 environ_base=FAR)
    far.get("/_gateway/services", headers=bearer(token))  # a read: not audited
    assert len(audit_lines) == 5, audit_lines
    mint_line, ok, forbidden, anonymous, policy = audit_lines
    assert "actor=\"address 127.0.0.1\"" in mint_line and "action=mint_registration_token" \
        in mint_line and f"credential={minted['id']}" in mint_line
    assert f'actor="registration deployer {minted["id"]}"' in ok
    assert "action=register service=orders" in ok and "status=201" in ok
    assert "address=http://10.0.0.7:8000" in ok and "client=10.9.8.7" in ok
    assert "service=other" in forbidden and "status=403 error=forbidden" in forbidden
    assert "actor=anonymous" in anonymous and "status=401 error=unauthorized" in anonymous
    assert 'actor="admin token"' in policy and "action=put_policy" in policy
    for line in audit_lines:
        assert token not in line and "forged.token" not in line and "admin-token" not in line
        assert minted["token"].split(".")[2] not in line


def test_audit_lines_in_json(make_app, audit_lines):
    client = make_app(GATEWAY_LOG_FORMAT="json").test_client()
    client.post("/register_service", data="svc,http://10.0.0.7:8000")
    entry = json.loads(audit_lines[-1])
    assert entry["type"] == "audit" and entry["action"] == "register"
    assert entry["actor"] == "address 127.0.0.1" and entry["status"] == 201
    assert entry["service"] == "svc" and entry["address"] == "http://10.0.0.7:8000"


def test_credentials_round_trip():
    credentials = RegistrationCredentials(b"k" * 32)
    token, claims = credentials.mint(["a"], 60, None)
    verified = credentials.verify(token, {})
    assert verified.services == {"a"} and verified.subject == "registration:a"
    assert verified.id == claims["jti"]
    assert make_token()  # (tokens for services are another key's)
    assert load_settings({}).registration_key_path.name == "registration-key"
