"""Rate limits: token buckets, headers, 429 before the upstream, bounded state."""

import logging

import pytest
import responses

from gateway_app.ratelimit import MAX_RATE_LIMIT, RateLimitError, SharedBuckets, parse_rate_limit
from tests.conftest import make_token

UPSTREAM = "http://upstream.test:9000"


@pytest.fixture
def upstream(upstream):
    upstream.add(responses.GET, responses.matchers.re.compile(f"{UPSTREAM}.*"), body="ok")
    return upstream


def gateway(make_app, **env):
    client = make_app(**env).test_client()
    client.post("/register_service", data=f"svc,{UPSTREAM}")
    client.post("/register_service", data=f"other,{UPSTREAM}")
    return client


def test_headers_on_every_response_and_429_before_the_upstream(make_app, upstream):
    client = gateway(make_app, GATEWAY_RATE_LIMIT="3/minute")
    auth = {"Authorization": make_token(sub="alice")}
    remaining = []
    for _ in range(3):
        response = client.get("/svc", headers=auth)
        assert response.status_code == 200
        assert response.headers["RateLimit-Limit"] == "3"
        remaining.append(response.headers["RateLimit-Remaining"])
        assert 0 < int(response.headers["RateLimit-Reset"]) <= 60
    assert remaining == ["2", "1", "0"]
    refused = client.get("/svc", headers=auth)
    assert refused.status_code == 429
    assert refused.get_json()["error"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert len(upstream.calls) == 3


def test_clients_are_keyed_by_subject_else_address(make_app, upstream):
    client = gateway(make_app, GATEWAY_RATE_LIMIT="1/minute")
    alice, bob = make_token(sub="alice"), make_token(sub="bob")
    assert client.get("/svc", headers={"Authorization": alice}).status_code == 200
    assert client.get("/svc", headers={"Authorization": alice}).status_code == 429
    # another token for the same subject shares the bucket
    assert client.get("/svc", headers={"Authorization": make_token(sub="alice", ttl=99)}
                      ).status_code == 429
    assert client.get("/svc", headers={"Authorization": bob}).status_code == 200
    client.put("/_gateway/services/other/policy", json={"auth": "none"})
    here, there = {"REMOTE_ADDR": "198.51.100.1"}, {"REMOTE_ADDR": "198.51.100.2"}
    assert client.get("/other", environ_base=here).status_code == 200
    assert client.get("/other", environ_base=here).status_code == 429
    assert client.get("/other", environ_base=there).status_code == 200


def test_refused_tokens_count_against_the_client_address(make_app, upstream):
    client = gateway(make_app, GATEWAY_RATE_LIMIT="2/minute")
    client.put("/_gateway/services/other/policy", json={"auth": "none"})
    here = {"REMOTE_ADDR": "198.51.100.9"}
    bad = client.get("/svc", headers={"Authorization": "Bearer nope"}, environ_base=here)
    assert bad.status_code == 401 and bad.headers["RateLimit-Remaining"] == "1"
    assert client.get("/other", environ_base=here).status_code == 200
    assert client.get("/other", environ_base=here).status_code == 429


def test_per_service_limit_and_off(make_app, upstream):
    client = gateway(make_app, GATEWAY_RATE_LIMIT="1/minute")
    auth = {"Authorization": make_token()}
    client.put("/_gateway/services/svc/policy", json={"rate_limit": "5/minute, burst=2"})
    client.put("/_gateway/services/other/policy", json={"rate_limit": "off"})
    statuses = [client.get("/svc", headers=auth).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # the service's own bucket: burst 2
    for _ in range(5):
        response = client.get("/other", headers=auth)
        assert response.status_code == 200 and "RateLimit-Limit" not in response.headers


def test_no_limit_configured_means_no_headers(make_app, upstream):
    client = gateway(make_app)
    response = client.get("/svc", headers={"Authorization": make_token()})
    assert response.status_code == 200 and "RateLimit-Limit" not in response.headers


def test_buckets_refill_and_state_is_bounded(tmp_path, monkeypatch):
    import time

    buckets = SharedBuckets(tmp_path / "b", slots=16)
    limit = parse_rate_limit("2/second")
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    assert [buckets.take("a", limit).allowed for _ in range(3)] == [True, True, False]
    now[0] += 0.5
    decision = buckets.take("a", limit)
    assert decision.allowed and decision.remaining == 0
    # a thousand clients pass through a 16-slot table; the file never grows
    for i in range(1000):
        assert buckets.take(f"client-{i}", limit).allowed
    assert (tmp_path / "b").stat().st_size == 16 * 32
    now[0] += 10  # everyone idle long enough to be full again: all slots reusable
    assert buckets.take("a", limit).remaining == 1
    buckets.close()


def test_access_log_lines(make_app, upstream):
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    access = logging.getLogger("gateway.access")
    access.addHandler(handler)
    try:
        for log_format in ("text", "json"):
            records.clear()
            client = gateway(make_app, GATEWAY_LOG_FORMAT=log_format)
            token = make_token(sub="alice")
            response = client.get("/svc/path?secret=hunter2", headers={"Authorization": token})
            response.close()
            line = records[-1]
            assert token not in line and "hunter2" not in line
            if log_format == "json":
                import json

                fields = json.loads(line)
                assert fields["path"] == "/svc/path" and fields["service"] == "svc"
                assert fields["status"] == 200 and fields["bytes"] == 2
                assert fields["request_id"] == response.headers["X-Request-ID"]
                assert fields["upstream_ms"] >= 0 and fields["total_ms"] >= fields["upstream_ms"]
            else:
                assert '"GET /svc/path" svc' in line and " 200 2 " in line
    finally:
        access.removeHandler(handler)


def test_access_lines_are_buffered_then_written_in_order():
    import io

    from gateway_app.accesslog import BufferedLineHandler
    from tests.support import wait_for

    stream = io.StringIO()
    handler = BufferedLineHandler(stream, interval=3600, max_lines=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.buffered")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("one")
        logger.warning("two")
        assert stream.getvalue() == ""  # not yet: buffered
        logger.warning("three")  # the buffer is full: the writer thread is woken
        wait_for(lambda: stream.getvalue() == "one\ntwo\nthree\n", timeout=10,
                 what="the writer thread")
        logger.warning("four")
        handler.flush()  # what a worker on its way out does
        assert stream.getvalue().endswith("three\nfour\n")
    finally:
        logger.removeHandler(handler)


def test_rate_limit_forms():
    limit = parse_rate_limit("100/second")
    assert (limit.limit, limit.period, limit.burst) == (100, 1.0, 100)
    limit = parse_rate_limit("600/minute, burst=50")
    assert (limit.rate, limit.burst) == (10.0, 50)


@pytest.mark.parametrize("text", [
    "9" * 400 + "/second",  # accepted, then every request overflowed a float: a 500
    "9" * 5000 + "/minute",  # beyond int()'s digit limit: a ValueError, not a RateLimitError
    "1000000001/second",
    "10/second, burst=1000000001",
    "10/second, burst=" + "9" * 400,
    "0/second",
    "10/second, burst=0",
    "\u0663/second",  # an Arabic-Indic three: \\d matches it, int() reads it
])
def test_rate_limits_out_of_bounds_are_refused(text):
    with pytest.raises(RateLimitError, match="rate_limit"):
        parse_rate_limit(text)


def test_rate_limit_bounds_are_inclusive():
    top = parse_rate_limit(f"{MAX_RATE_LIMIT}/second, burst={MAX_RATE_LIMIT}")
    assert (top.rate, top.burst) == (MAX_RATE_LIMIT, MAX_RATE_LIMIT)
    assert parse_rate_limit("1/hour, burst=1").rate == 1 / 3600
