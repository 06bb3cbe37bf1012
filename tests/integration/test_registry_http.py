"""The registry over real gunicorn with several workers and the SQLite store."""

from __future__ import annotations

import time

import pytest
import requests

from tests.support import wait_for

BAD_REGISTRATIONS = [
    ("", "text/plain"),
    ("hello_service", "text/plain"),
    ("bad name,http://127.0.0.1:1", "text/plain"),
    ("_gateway,http://127.0.0.1:1", "text/plain"),
    ("x,http://169.254.169.254/latest", "text/plain"),
    ("x,http://[fe80::1]:80", "text/plain"),
    ("x,http://0.0.0.0:80", "text/plain"),
    ("x,http://user:pw@127.0.0.1:1", "text/plain"),
    ("x,http://127.0.0.1:1/?q=1", "text/plain"),
    ("x,http://127.0.0.1:70000", "text/plain"),
    ('{"name": "x", "address": "http://127.0.0.1:1", "ttl": true}', "application/json"),
    ('{"name": "x", "address": "http://127.0.0.1:1", "weight": 0}', "application/json"),
    ('{"name": "x"', "application/json"),
]


def test_every_bad_input_is_400_and_leaves_the_registry_unchanged(gateway):
    assert gateway.register("keep", "http://127.0.0.1:1").status_code == 201
    before = gateway.services()
    for body, content_type in BAD_REGISTRATIONS:
        response = requests.post(gateway.url + "/register_service", data=body.encode(),
                                 headers={"Content-Type": content_type}, timeout=5)
        assert response.status_code == 400, body
        assert response.json()["error"] == "bad_request"
    big = requests.post(gateway.url + "/register_service", data=b"x," + b"a" * 70000, timeout=5)
    assert big.status_code == 413
    assert gateway.services() == before


def test_a_write_through_one_worker_reaches_all_workers_within_a_second(start_gateway,
                                                                         upstream, auth):
    gateway = start_gateway(GATEWAY_WORKERS=4)
    assert len(gateway.worker_pids()) == 4

    # The second runs from the acknowledgement: how long the write itself took to answer on
    # a busy machine is not what the contract is about.
    assert gateway.register("svc", upstream.address).status_code == 201
    acknowledged = time.monotonic()
    gateway.wait_routable("/svc/", auth, 200, timeout=1.0)
    assert time.monotonic() - acknowledged < 1.5  # (the last round of probes may overrun)

    response = requests.post(gateway.url + "/deregister_service", data="svc", timeout=5)
    assert response.status_code == 200
    acknowledged = time.monotonic()
    gateway.wait_routable("/svc/", auth, 404, timeout=1.0)
    assert time.monotonic() - acknowledged < 1.5


def test_sqlite_registrations_survive_restart_and_kill_9(start_gateway, tmp_path):
    first = start_gateway()
    assert first.register("durable", "http://127.0.0.1:9001").status_code == 201
    response = first.register("leased", "http://127.0.0.1:9002", ttl=3600, weight=3,
                              metadata={"zone": "a"})
    assert response.status_code == 201
    first.kill9()  # right after the acknowledgement: no shutdown code runs

    second = start_gateway()
    listing = {s["name"]: s["instances"][0] for s in second.services()["services"]}
    assert listing["durable"]["address"] == "http://127.0.0.1:9001"
    assert (listing["leased"]["weight"], listing["leased"]["metadata"]) == (3, {"zone": "a"})
    assert listing["leased"]["id"] == response.json()["instance"]["id"]
    second.stop()

    third = start_gateway()  # and after a clean stop
    assert {s["name"] for s in third.services()["services"]} == {"durable", "leased"}


def test_lapsed_lease_leaves_rotation_and_listing(start_gateway, upstream, auth):
    gateway = start_gateway()
    assert gateway.register("short", upstream.address, ttl=2).status_code == 201
    lapsed_at = time.monotonic() + 2
    gateway.wait_routable("/short/", auth)

    def gone():
        return "short" not in {s["name"] for s in gateway.services()["services"]}

    wait_for(gone, timeout=2 + 5, what="the lapsed instance to leave the listing")
    assert time.monotonic() - lapsed_at < 5
    gateway.wait_routable("/short/", auth, 404, timeout=1.0)  # every worker within the second


def test_heartbeat_keeps_a_lease_alive(start_gateway, upstream, auth):
    gateway = start_gateway()
    instance = gateway.register("beating", upstream.address, ttl=2).json()["instance"]
    gateway.wait_routable("/beating/", auth)
    beat_url = f"{gateway.url}/_gateway/services/beating/instances/{instance['id']}/heartbeat"
    deadline = time.monotonic() + 3.5  # longer than the ttl
    while time.monotonic() < deadline:
        assert requests.put(beat_url, timeout=5).status_code == 200
        assert gateway.fresh_get("/beating/", auth).status_code == 200
        time.sleep(0.5)  # the heartbeat period of the service under test


@pytest.mark.parametrize("env, message", [
    ({"GATEWAY_WORKERS": "many"}, "GATEWAY_WORKERS"),
    ({"GATEWAY_STORE": "memory://", "GATEWAY_WORKERS": "2"}, "each worker would see"),
    ({"GATEWAY_JWT_ALGORITHMS": "RS256"}, "GATEWAY_JWT_PUBLIC_KEY_FILE"),
])
def test_bad_configuration_stops_the_start_with_a_message(start_gateway, env, message):
    gateway = start_gateway(wait=False, **env)
    assert gateway.proc.wait(20) != 0
    assert message in gateway.log()


def test_generated_secret_is_shared_by_all_workers(start_gateway, upstream, tmp_path):
    import jwt

    gateway = start_gateway(GATEWAY_JWT_SECRET="", GATEWAY_WORKERS=3)
    secret_file = tmp_path / "data" / "jwt-secret"
    assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
    token = jwt.encode({"sub": "me", "exp": int(time.time()) + 60},
                       secret_file.read_bytes().strip(), algorithm="HS256")
    gateway.register("svc", upstream.address)
    gateway.wait_routable("/svc/", {"Authorization": token})


def test_the_listing_pages_through_every_worker(gateway):
    session = requests.Session()
    for n in range(130):
        assert session.post(gateway.url + "/register_service",
                            data=f"page{n:03d},http://10.9.0.{n + 1}:80", timeout=5
                            ).status_code == 201
    first = requests.get(gateway.url + "/_gateway/services", timeout=5).json()
    assert len(first["services"]) == 100 and first["next"] == "page099"
    names, cursor = [], None
    while True:  # a new connection per page: the pages come from either worker
        query = f"?limit=40&after={cursor}" if cursor else "?limit=40"
        page = gateway.fresh_get("/_gateway/services" + query).json()
        names += [s["name"] for s in page["services"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert names == [f"page{n:03d}" for n in range(130)]
    one = gateway.fresh_get("/_gateway/services/page042").json()
    assert one["name"] == "page042" and one["instances"][0]["address"] == "http://10.9.0.43"
    bad = gateway.fresh_get("/_gateway/services?limit=5000")
    assert (bad.status_code, bad.json()["error"]) == (400, "bad_request")
