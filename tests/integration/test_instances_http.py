"""Many instances over real gunicorn, with upstreams that are real processes tests can kill."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from gateway_app.registration import SelfRegistration
from tests.support import READY_TIMEOUT, ROOT, free_port, wait_for


class UpstreamProcess:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> UpstreamProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.upstream_app", str(self.port)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.proc:
            self.proc.stdout.close()


@pytest.fixture
def upstreams():
    started: list[UpstreamProcess] = []

    def start(count: int = 3) -> list[UpstreamProcess]:
        new = [UpstreamProcess().start() for _ in range(count)]
        started.extend(new)
        return new

    start.started = started
    yield start
    for upstream in started:
        upstream.kill()


def register_all(gateway, name, upstreams, **fields):
    for upstream in upstreams:
        assert gateway.register(name, upstream.address, **fields).status_code == 201


def test_killing_one_of_three_under_load(start_gateway, upstreams, auth):
    gateway = start_gateway(GATEWAY_WORKERS=2)
    three = upstreams(3)
    register_all(gateway, "svc", three)
    gateway.wait_routable("/svc/", auth)
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set() and len(results) < 5000:
            try:
                status = session.get(gateway.url + "/svc/", headers=auth, timeout=5).status_code
            except requests.RequestException:
                status = 0
            results.append((time.monotonic(), status))
        session.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) > 200, timeout=10, what="steady load")
    three[0].kill()
    killed_at = time.monotonic()
    wait_for(lambda: len([r for r in results if r[0] > killed_at]) > 600, timeout=30,
             what="load after the kill")
    stop.set()
    for t in threads:
        t.join(10)
    after = [status for moment, status in results if moment > killed_at]
    errors = [s for s in after if s != 200]
    # connection refused is retried on another instance: clients see no error at all, and
    # never more than 5 per worker before the instance is ejected
    assert len(errors) <= 5 * 2, collections.Counter(after)
    assert after[-100:] == [200] * 100
    listing = requests.get(gateway.url + "/_gateway/services/svc", timeout=5).json()
    dead = [i for i in listing["instances"] if i["address"] == three[0].address][0]
    assert dead["ejected_until"] is not None and dead["health"] == "unhealthy"


def test_ejected_instance_recovers_when_it_returns(start_gateway, upstreams, auth):
    gateway = start_gateway(GATEWAY_WORKERS=1, GATEWAY_EJECTION_SECONDS=1)
    two = upstreams(2)
    register_all(gateway, "svc", two)
    gateway.wait_routable("/svc/", auth)
    port = two[0].port
    two[0].kill()
    for _ in range(12):  # five failures reach the dead one; all are retried elsewhere
        assert gateway.fresh_get("/svc/", auth).status_code == 200
    back = UpstreamProcess(port).start()
    upstreams.started.append(back)

    def serves_again():
        ports = {gateway.fresh_get("/svc/", auth).json()["port"] for _ in range(6)}
        return port in ports

    wait_for(serves_again, timeout=READY_TIMEOUT, what="the instance to take traffic again")


def test_round_robin_spread_within_ten_percent(start_gateway, upstreams, auth):
    gateway = start_gateway(GATEWAY_WORKERS=2)
    three = upstreams(3)
    register_all(gateway, "svc", three)
    gateway.wait_routable("/svc/", auth)
    session = requests.Session()
    ports = collections.Counter(
        session.get(gateway.url + "/svc/", headers=auth, timeout=5).json()["port"]
        for _ in range(600))
    session.close()
    assert set(ports) == {u.port for u in three}
    assert all(abs(count - 200) <= 20 for count in ports.values()), ports


def test_panic_threshold(start_gateway, upstreams, auth):
    gateway = start_gateway(GATEWAY_WORKERS=1)
    three = upstreams(3)
    register_all(gateway, "svc", three)
    gateway.wait_routable("/svc/", auth)
    for _ in range(30):  # every instance answers 503 here, until all are ejected
        gateway.fresh_get("/svc/status/503", auth)
    listing = requests.get(gateway.url + "/_gateway/services/svc", timeout=5).json()
    assert all(i["ejected_until"] for i in listing["instances"])
    # all ejected: traffic goes to all of them rather than to none
    assert gateway.fresh_get("/svc/", auth).status_code == 200


def test_drain_lets_in_flight_requests_finish(start_gateway, upstreams, auth):
    gateway = start_gateway(GATEWAY_WORKERS=1)
    one, other = upstreams(2)
    instance = gateway.register("svc", one.address).json()["instance"]
    gateway.wait_routable("/svc/", auth)
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(
        response=gateway.fresh_get("/svc/slow/3", auth)))
    thread.start()
    wait_for(lambda: requests.get(gateway.url + "/_gateway/services/svc", timeout=5)
             .json()["instances"][0]["in_flight"] == 1, timeout=READY_TIMEOUT,
             what="the slow request")
    drained = requests.put(
        f"{gateway.url}/_gateway/services/svc/instances/{instance['id']}/drain", timeout=5)
    assert drained.json()["health"] == "draining"
    gateway.wait_routable("/svc/", auth, 503)  # no new traffic to it...
    gateway.register("svc", other.address)
    gateway.wait_routable("/svc/", auth, 200)  # ...the other instance takes it
    assert gateway.fresh_get("/svc/", auth).json()["port"] == other.port
    thread.join(10)
    assert slow["response"].status_code == 200  # ...and the one in flight finished
    assert slow["response"].json()["port"] == one.port


def test_a_drain_is_undone_by_re_registering_or_by_deleting_it(start_gateway, upstreams, auth):
    gateway = start_gateway(GATEWAY_WORKERS=2)
    (one,) = upstreams(1)
    instance = gateway.register("svc", one.address).json()["instance"]
    gateway.wait_routable("/svc/", auth)
    drain_url = f"{gateway.url}/_gateway/services/svc/instances/{instance['id']}/drain"
    assert requests.put(drain_url, timeout=5).json()["health"] == "draining"
    gateway.wait_routable("/svc/", auth, 503)

    again = gateway.register("svc", one.address)  # the README: re-registration brings it back
    assert again.status_code == 200
    assert again.json()["instance"]["health"] != "draining"
    gateway.wait_routable("/svc/", auth, 200)  # on every worker, within a second

    assert requests.put(drain_url, timeout=5).json()["health"] == "draining"
    gateway.wait_routable("/svc/", auth, 503)
    undone = requests.delete(drain_url, timeout=5)
    assert undone.status_code == 200
    assert undone.json()["id"] == instance["id"] and undone.json()["health"] != "draining"
    gateway.wait_routable("/svc/", auth, 200)
    assert requests.delete(drain_url, timeout=5).status_code == 200  # not draining: harmless
    missing = requests.delete(drain_url.replace(instance["id"], "0" * 16), timeout=5)
    assert (missing.status_code, missing.json()["error"]) == (404, "instance_not_found")


def test_lease_lapse_moves_traffic_to_the_other_instance(start_gateway, upstreams, auth):
    gateway = start_gateway()
    leased, steady = upstreams(2)
    gateway.register("svc", leased.address, ttl=2)
    gateway.register("svc", steady.address)
    gateway.wait_routable("/svc/", auth)
    lapse = time.monotonic() + 2
    wait_for(lambda: time.monotonic() > lapse, timeout=5, what="the lease to lapse")
    ports = {gateway.fresh_get("/svc/", auth).json()["port"] for _ in range(10)}
    assert ports == {steady.port}


def test_self_registration_client_heartbeats_and_recovers_a_lost_lease(start_gateway,
                                                                       upstreams, auth):
    gateway = start_gateway()
    (upstream,) = upstreams(1)
    registration = SelfRegistration(gateway.url, "selfreg", upstream.address, ttl=1.5)
    instance = registration.start()
    try:
        gateway.wait_routable("/selfreg/", auth)
        beat_deadline = time.monotonic() + 3.5  # more than two ttls: heartbeats must keep it
        wait_for(lambda: time.monotonic() > beat_deadline, timeout=5, what="a few heartbeats")
        assert gateway.fresh_get("/selfreg/", auth).status_code == 200
        # the gateway loses it (as after a restart with an empty store): the next beat's 404
        # makes the client register again
        url = f"{gateway.url}/_gateway/services/selfreg/instances/{instance['id']}"
        assert requests.delete(url, timeout=5).status_code == 200
        gateway.wait_routable("/selfreg/", auth, (200,), timeout=30)
    finally:
        registration.stop()
    gateway.wait_routable("/selfreg/", auth, 404)


def test_active_health_check_over_http(start_gateway, upstreams, auth):
    gateway = start_gateway(GATEWAY_WORKERS=1)
    (upstream,) = upstreams(1)
    policy = {"health_check": {"path": "/status/200", "interval": 0.3, "timeout": 0.2,
                               "unhealthy_threshold": 1, "healthy_threshold": 1}}
    assert requests.put(f"{gateway.url}/_gateway/services/svc/policy", json=policy,
                        timeout=5).status_code == 201
    gateway.register("svc", upstream.address)
    gateway.wait_routable("/svc/", auth, 200, timeout=30)
    upstream.kill()
    wait_for(lambda: requests.get(gateway.url + "/_gateway/services/svc", timeout=5).json()
             ["instances"][0]["health"] == "unhealthy", timeout=30, what="the failed probe")
    gateway.wait_routable("/svc/", auth, 503)  # a failing check takes it out of rotation
