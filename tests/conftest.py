"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import jwt
import pytest

from gateway_app import create_app

SECRET = "unit-test-secret-that-is-long-enough-0123456789"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GATEWAY_* or proxy variable of the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("GATEWAY_") or key.lower() in (
            "http_proxy", "https_proxy", "all_proxy", "no_proxy"
        ):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def make_app(tmp_path):
    """Build gateways with the memory store and a known secret; closed after the test."""
    apps = []

    def make(**overrides):
        config = {
            "GATEWAY_STORE": "memory://",
            "GATEWAY_WORKERS": "1",
            "GATEWAY_DATA_DIR": str(tmp_path / "data"),
            "GATEWAY_JWT_SECRET": SECRET,
        }
        config.update({k: str(v) for k, v in overrides.items()})
        app = create_app(config)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["gateway"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def space():
    """A key prefix of its own in the shared Redis on 127.0.0.1:6379, removed after the test."""
    from tests.redis_support import SharedPrefix, require_shared_redis

    require_shared_redis()
    shared = SharedPrefix()
    yield shared
    shared.cleanup()


def make_token(sub: str = "alice", secret: str = SECRET, algorithm: str = "HS256",
               ttl: float = 300, **claims) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + ttl}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=algorithm)


@pytest.fixture
def token() -> str:
    return make_token()


@pytest.fixture
def auth(token) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def iter_listing(client) -> Iterator[tuple[str, dict]]:
    for service in client.get("/_gateway/services").get_json()["services"]:
        for instance in service["instances"]:
            yield service["name"], instance
