"""Fixtures that start real gunicorn gateways and real loopback upstreams."""

from __future__ import annotations

import pytest

from tests.conftest import SECRET, make_token
from tests.support import Gateway, UpstreamServer


@pytest.fixture
def upstream():
    with UpstreamServer() as server:
        yield server


@pytest.fixture
def start_gateway(tmp_path):
    """Start gateways (2 workers, SQLite in ``tmp_path``); all stopped after the test."""
    started: list[Gateway] = []

    def start(data_dir=None, wait=True, **env) -> Gateway:
        env.setdefault("GATEWAY_JWT_SECRET", SECRET)
        gateway = Gateway(data_dir or tmp_path / "data", **env)
        started.append(gateway)
        return gateway.start(wait=wait)

    yield start
    for gateway in started:
        gateway.discard()


@pytest.fixture
def gateway(start_gateway):
    return start_gateway()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token()}"}
