"""Several gateways over one Redis: real gunicorn masters on different ports, real Redis.

The shared Redis on 127.0.0.1:6379 holds the registry for the two-gateway tests (each test on
its own key prefix, deleted afterwards); the outage test runs its own ``redis-server`` on a free
port, which it stops and starts again.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from tests.conftest import make_token
from tests.redis_support import RedisServer
from tests.support import READY_TIMEOUT, wait_for


@pytest.fixture
def pair(start_gateway, space, tmp_path):
    """Two gateways (separate gunicorn masters, 2 workers each) sharing one Redis registry
    (with the shared server's generous timeouts: see SharedPrefix)."""
    first = start_gateway(data_dir=tmp_path / "a", wait=False, GATEWAY_STORE=space.url)
    second = start_gateway(data_dir=tmp_path / "b", wait=False, GATEWAY_STORE=space.url)
    first.wait_ready()
    second.wait_ready()
    return first, second


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub=sub)}"}


def test_a_write_on_one_gateway_routes_and_applies_on_the_other(pair, upstream):
    one, two = pair
    registered = time.monotonic()
    assert one.register("svc", upstream.address).status_code == 201
    two.wait_routable("/svc/", bearer("router"), 200, timeout=1.0)
    assert time.monotonic() - registered < 1.5

    # a policy set through the second applies on the first (every worker) within a second
    policy = {"rate_limit": "10/minute", "response_headers": {"add": {"X-Policy": "set-on-two"}}}
    set_at = time.monotonic()
    response = requests.put(two.url + "/_gateway/services/svc/policy", json=policy, timeout=5)
    assert response.status_code == 201
    probe = bearer("probe")
    wait_for(lambda: all(one.fresh_get("/svc/", probe).headers.get("RateLimit-Limit") == "10"
                         for _ in range(4)), 1.0, what="the policy on every worker of the first")
    assert time.monotonic() - set_at < 1.5
    assert one.fresh_get("/svc/", bearer("other")).headers["X-Policy"] == "set-on-two"

    # its limit holds across both gateways and all four workers: 10 in total, not 10 each
    counted = bearer("counted")
    statuses = [(one, two)[n % 2].fresh_get("/svc/", counted).status_code for n in range(24)]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 14

    # removal, too
    assert requests.delete(two.url + "/_gateway/services/svc", timeout=5).status_code == 200
    one.wait_routable("/svc/", bearer("router"), 404, timeout=1.0)


def test_concurrent_registrations_through_both_gateways_lose_nothing(pair):
    one, two = pair

    def register(n: int) -> int:
        gateway = (one, two)[n % 2]
        return requests.post(gateway.url + "/register_service",
                             data=f"many,http://10.1.{n // 250}.{n % 250 + 1}:8080",
                             headers={"Connection": "close"}, timeout=10).status_code

    with ThreadPoolExecutor(max_workers=100) as pool:
        statuses = list(pool.map(register, range(100)))
    assert statuses == [201] * 100
    for gateway in pair:
        [service] = gateway.services()["services"]
        assert len(service["instances"]) == 100
        assert len({i["id"] for i in service["instances"]}) == 100


def test_a_redis_outage_keeps_routing_fails_writes_quickly_and_heals(start_gateway, upstream,
                                                                      tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        gateway = start_gateway(data_dir=tmp_path / "gw", GATEWAY_STORE=server.url,
                                GATEWAY_RATE_LIMIT="1000/minute")
        auth = bearer("through-the-outage")
        assert gateway.register("svc", upstream.address).status_code == 201
        gateway.wait_routable("/svc/", auth, 200)

        server.stop()
        # routing from the last snapshot, on every worker; rate limits fail open
        for _ in range(12):
            response = gateway.fresh_get("/svc/", auth)
            assert response.status_code == 200
            assert response.headers["RateLimit-Limit"] == "1000"
        # writes fail cleanly and quickly
        for call in (lambda: gateway.register("other", upstream.address),
                     lambda: requests.put(gateway.url + "/_gateway/services/svc/policy",
                                          json={"auth": "none"}, timeout=5),
                     lambda: requests.post(gateway.url + "/deregister_service", data="svc",
                                           timeout=5)):
            started = time.monotonic()
            response = call()
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "store_unavailable"
            assert elapsed < 2.0
        assert gateway.fresh_get("/svc/", auth).status_code == 200  # nothing changed
        assert "rate limits: Redis" in gateway.log()  # the fail-open warning

        server.start()  # the same port, its data gone (no persistence)
        wait_for(lambda: gateway.register("svc", upstream.address).status_code == 201,
                 READY_TIMEOUT, 0.1, "registrations to work again")
        gateway.wait_routable("/svc/", auth, 200)
        # and every worker follows new writes again
        assert gateway.register("fresh", upstream.address).status_code == 201
        gateway.wait_routable("/fresh/", auth, 200, timeout=1.0)
        limited = bearer("after")
        requests.put(gateway.url + "/_gateway/services/fresh/policy",
                     json={"rate_limit": "2/minute"}, timeout=5).raise_for_status()
        wait_for(lambda: gateway.fresh_get("/fresh/", limited).status_code == 429,
                 READY_TIMEOUT, what="limits from Redis again")
    finally:
        server.stop()


def written(listing: dict) -> dict:
    """The listing without what traffic moves (requests in flight, reported by each worker
    a moment later): what registry writes made."""
    for service in listing["services"]:
        for instance in service["instances"]:
            instance.pop("in_flight")
    return listing


def test_writes_answered_503_while_redis_hung_never_take_effect(start_gateway, upstream,
                                                                 tmp_path):
    """Redis paused (SIGSTOP) past the socket timeout, then resumed: the writes the gateway
    answered with 503 meanwhile are not applied when Redis runs what it held."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        gateway = start_gateway(data_dir=tmp_path / "gw", GATEWAY_STORE=server.url)
        auth = bearer("hung")
        assert gateway.register("svc", upstream.address).status_code == 201
        instance = gateway.services()["services"][0]["instances"][0]
        gateway.wait_routable("/svc/", auth, 200)
        before = written(gateway.services())

        server.proc.send_signal(signal.SIGSTOP)
        try:
            calls = [
                lambda: gateway.register("late", upstream.address),
                lambda: requests.put(gateway.url + "/_gateway/services/svc/instances/"
                                     f"{instance['id']}/drain", timeout=5),
                lambda: requests.put(gateway.url + "/_gateway/services/svc/policy",
                                     json={"rate_limit": "1/hour"}, timeout=5),
                lambda: requests.post(gateway.url + "/deregister_service", data="svc",
                                      timeout=5),
            ]
            for call in calls:
                response = call()
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "store_unavailable"
        finally:
            server.proc.send_signal(signal.SIGCONT)
        # Redis answers again, and a write after them is seen by every worker: Redis has run
        # whatever it held, and every worker has caught up past it.
        with redis.Redis("127.0.0.1", server.port, socket_timeout=READY_TIMEOUT) as client:
            assert client.ping()
        assert gateway.register("marker", upstream.address).status_code == 201
        gateway.wait_routable("/marker/", auth, 200)
        assert requests.post(gateway.url + "/deregister_service", data="marker",
                             timeout=5).status_code == 200
        gateway.wait_routable("/marker/", auth, 404)
        assert written(gateway.services()) == before
        for _ in range(8):
            assert gateway.fresh_get("/late/", auth).status_code == 404
            assert gateway.fresh_get("/svc/", auth).status_code == 200
    finally:
        server.stop()


def test_many_clients_during_an_outage_do_not_hang(start_gateway, upstream, tmp_path):
    """Requests arriving while Redis goes away are answered, none waits on Redis for long."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        gateway = start_gateway(data_dir=tmp_path / "gw", GATEWAY_STORE=server.url,
                                GATEWAY_RATE_LIMIT="100000/minute")
        auth = bearer("crowd")
        assert gateway.register("svc", upstream.address).status_code == 201
        gateway.wait_routable("/svc/", auth, 200)
        stop = threading.Event()
        slowest = [0.0]
        statuses: list[int] = []

        def client() -> None:
            while not stop.is_set():
                started = time.monotonic()
                statuses.append(gateway.fresh_get("/svc/", auth, timeout=5).status_code)
                slowest[0] = max(slowest[0], time.monotonic() - started)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(statuses) > 20, 30, what="traffic")
            server.stop()
            count = len(statuses)
            wait_for(lambda: len(statuses) > count + 40, 30, what="traffic during the outage")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert set(statuses) == {200}
        assert slowest[0] < 1.0
    finally:
        server.stop()
