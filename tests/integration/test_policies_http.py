"""Policies, rate limits and the access log over real gunicorn with several workers."""

from __future__ import annotations

import json
import re

import requests

from tests.conftest import make_token
from tests.support import READY_TIMEOUT, wait_for

SEED_POLICY = {
    "request_headers": {"add": {"X-Custom-Header": "My API Gateway"}},
    "response_headers": {"add": {"X-Custom-Header": "My API Gateway"}},
    "response_json": {"add": {"custom": "This is a custom message"}},
}


def put_policy(gateway, name, doc):
    return requests.put(f"{gateway.url}/_gateway/services/{name}/policy", json=doc, timeout=5)


def test_rate_limit_holds_across_workers_and_refuses_before_the_upstream(start_gateway, upstream):
    gateway = start_gateway(GATEWAY_WORKERS=3, GATEWAY_RATE_LIMIT="10/minute")
    auth = {"Authorization": make_token(sub="alice")}
    gateway.register("svc", upstream.address)
    # routable on every worker (probing as another client, whose tokens run out on the way)
    gateway.wait_routable("/svc/", {"Authorization": make_token(sub="probe")}, (200, 429))
    upstream.seen.clear()
    statuses = [gateway.fresh_get("/svc/", auth).status_code for _ in range(30)]
    assert statuses.count(200) == 10, statuses  # not 10 per worker
    assert statuses.count(429) == 20
    assert len([s for s in upstream.seen if s["headers"].get("X-Authenticated-Subject") ==
                "alice"]) == 10
    refused = gateway.fresh_get("/svc/", auth)
    assert refused.headers["RateLimit-Limit"] == "10"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert int(refused.headers["Retry-After"]) >= 1


def test_policy_lifecycle_reaches_all_workers_and_survives_restart(start_gateway, upstream):
    gateway = start_gateway(GATEWAY_WORKERS=3)
    assert put_policy(gateway, "pub", {"auth": "none"}).status_code == 201  # before any instance
    gateway.register("pub", upstream.address)
    gateway.wait_routable("/pub/", {}, 200)  # public on every worker, no token
    gateway.kill9()

    again = start_gateway()
    stored = requests.get(f"{again.url}/_gateway/services/pub/policy", timeout=5)
    assert stored.status_code == 200 and stored.json()["auth"] == "none"
    assert again.fresh_get("/pub/").status_code == 200
    assert requests.delete(f"{again.url}/_gateway/services/pub/policy",
                           timeout=5).status_code == 200
    again.wait_routable("/pub/", {}, 401)
    bad = put_policy(again, "pub", {"auth": "maybe"})
    assert bad.status_code == 400
    assert requests.get(f"{again.url}/_gateway/services/pub/policy",
                        timeout=5).status_code == 404


def test_seed_transformations_end_to_end(gateway, upstream, auth):
    gateway.register("hello", upstream.address)
    assert put_policy(gateway, "hello", SEED_POLICY).status_code == 201
    gateway.wait_routable("/hello/greet", auth)

    def transformed():
        return gateway.fresh_get("/hello/greet", auth).headers.get("X-Custom-Header")

    wait_for(lambda: all(transformed() for _ in range(8)), READY_TIMEOUT,
             what="the policy on every worker")
    for _ in range(8):  # each request on a connection of its own, so on every worker
        response = gateway.fresh_get("/hello/greet", auth)
        body = response.json()
        assert body["custom"] == "This is a custom message"
        assert body["path"] == "/greet"
        assert body["headers"]["X-Custom-Header"] == "My API Gateway"
        assert int(response.headers["Content-Length"]) == len(response.content)
    big = gateway.fresh_get("/hello/big/3000000", auth)  # not JSON: streamed untouched
    assert len(big.content) == 3000000 and big.headers["X-Custom-Header"] == "My API Gateway"


def test_head_on_a_transformed_route_never_sends_the_untransformed_length(start_gateway,
                                                                         upstream, auth):
    """A HEAD answer may leave Content-Length out, but must not state a length other than the
    GET answer's (RFC 9110 section 8.6): the upstream's 21 is not the 36+ that GET sends."""
    gateway = start_gateway(GATEWAY_WORKERS=1)
    gateway.register("hello", upstream.address)
    assert put_policy(gateway, "hello", SEED_POLICY).status_code == 201
    got = gateway.fresh_get("/hello/json", auth)
    assert got.json() == {"greeting": "hello", "custom": "This is a custom message"}
    head = requests.head(gateway.url + "/hello/json", headers=auth, timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert head.headers.get("Content-Length") in (None, got.headers["Content-Length"])
    assert head.headers["X-Custom-Header"] == "My API Gateway"


def test_access_log_lines_text_and_json(start_gateway, upstream, tmp_path):
    token = make_token(sub="alice")
    for log_format in ("text", "json"):
        gateway = start_gateway(data_dir=tmp_path / log_format, GATEWAY_LOG_FORMAT=log_format)
        gateway.register("svc", upstream.address)
        gateway.wait_routable("/svc/", {"Authorization": token})
        response = gateway.fresh_get("/svc/big/1234?api_key=s3cr3t", {"Authorization": token,
                                                                      "X-Request-ID": "req-1"})
        assert response.status_code == 200
        gateway.stop(graceful=True)
        log = gateway.log()
        assert token not in log and "s3cr3t" not in log
        lines = [line for line in log.splitlines() if "req-1" in line]
        assert len(lines) == 1
        if log_format == "json":
            fields = json.loads(lines[0])
            assert fields["method"] == "GET" and fields["path"] == "/svc/big/1234"
            assert (fields["service"], fields["status"], fields["bytes"]) == ("svc", 200, 1234)
            assert fields["client"] == "127.0.0.1" and len(fields["instance"]) == 16
            assert fields["total_ms"] >= fields["upstream_ms"] >= 0
            assert re.fullmatch(r"[0-9a-f]{32}", fields["trace_id"])
        else:
            pattern = (r'^\S+Z req-1 127\.0\.0\.1 "GET /svc/big/1234" svc [0-9a-f]{16} 200 1234 '
                       r"[0-9.]+ [0-9.]+ [0-9a-f]{32}$")
            assert re.match(pattern, lines[0]), lines[0]
        assert "GET /svc/big" not in log.replace(lines[0], "")  # gunicorn's own line is off
