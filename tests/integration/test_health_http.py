"""Health, one view (issue 14, item 4): real gunicorn with several workers, real upstreams.

Whichever worker answers, the listing gives the same health for an instance (ejection, failures,
probe results, requests in flight) and the same timeline; an instance always recovers from an
ejection, passive or active. With Redis, every node of a cluster shares that view.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.conftest import make_token
from tests.support import Recorder, UpstreamServer, free_port, wait_for

ADMIN = "admin-token-for-health-tests"
ELSEWHERE = "192.0.2.0/24"  # TEST-NET-1: the tests call from loopback, which is not allowed
#: How many fresh connections a "whichever worker answers" check makes (3 workers).
ANSWERS = 9
#: The propagation bound of in-flight counts the README states (a second), with room for a
#: loaded machine.
PROPAGATION = 1.5


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub='health')}"}


def admin_get(gateway, path: str) -> requests.Response:
    return requests.get(gateway.url + path, timeout=10,
                        headers={"Connection": "close", "Authorization": f"Bearer {ADMIN}"})


def instance_views(gateway, service: str, address: str, answers: int = ANSWERS) -> list[dict]:
    """The instance as ``answers`` fresh connections (spread over the workers) list it."""
    views = []
    for _ in range(answers):
        response = admin_get(gateway, f"/_gateway/services/{service}")
        assert response.status_code == 200, response.text
        views.append(next(i for i in response.json()["instances"] if i["address"] == address))
    return views


def one_view(gateway, service: str, address: str) -> dict | None:
    """The instance's listing when every answer agrees on it, else ``None``."""
    views = instance_views(gateway, service, address)
    return views[0] if all(v == views[0] for v in views) else None


def events(gateway, service: str, instance_id: str) -> list[dict]:
    response = admin_get(gateway, f"/_gateway/services/{service}/instances/{instance_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["events"]


@pytest.fixture
def gateway(start_gateway):
    return start_gateway(GATEWAY_WORKERS=3, GATEWAY_EJECTION_SECONDS=1,
                         GATEWAY_ADMIN_ALLOW=ELSEWHERE, GATEWAY_ADMIN_TOKEN=ADMIN)


def register(gateway, name: str, address: str) -> str:
    response = requests.post(gateway.url + "/register_service", timeout=10,
                             headers={"Authorization": f"Bearer {ADMIN}"},
                             json={"name": name, "address": address})
    assert response.status_code in (200, 201), response.text
    return response.json()["instance"]["id"]


def test_passive_ejection_is_one_view_and_the_instance_recovers(gateway, upstream):
    dead_port = free_port()  # nothing listens there yet: connections are refused
    dead = f"http://127.0.0.1:{dead_port}"
    register(gateway, "svc", upstream.address)
    dead_id = register(gateway, "svc", dead)
    token = bearer()
    gateway.wait_routable("/svc/", token)

    # refused connections are retried on the good instance; the dead one is ejected after
    # five failures in a row, counted over all three workers
    def ejected():
        for _ in range(4):
            gateway.fresh_get("/svc/", token)
        view = one_view(gateway, "svc", dead)
        return view if view and view["state"] == "ejected" else None

    view = wait_for(ejected, 60, what="the dead instance ejected, in every worker's listing")
    assert view["health"] == "unhealthy" and view["ejected_until"] is not None
    timeline = events(gateway, "svc", dead_id)
    assert [e["cause"] for e in timeline] == ["registered",
                                              "5 consecutive failures: connection refused"]
    ejection = timeline[-1]
    assert ejection["value"] == 1.0 and ejection["node"] and isinstance(ejection["worker"], int)
    assert all(events(gateway, "svc", dead_id) == timeline for _ in range(ANSWERS))

    # it comes back: once the ejection is over it is tried again, and now it answers
    with UpstreamServer(dead_port) as revived:
        def recovered():
            gateway.fresh_get("/svc/", token)
            view = one_view(gateway, "svc", dead)
            return view if view and view["state"] == "healthy" and revived.seen else None

        view = wait_for(recovered, 60, what="the revived instance healthy everywhere")
        assert view["health"] == "healthy" and view["ejected_until"] is None
        assert view["consecutive_failures"] == 0
        wait_for(lambda: events(gateway, "svc", dead_id)[-1]["cause"]
                 == "request succeeded after ejection", 10, what="the recovery on the timeline")


def wait_state(gateway, service: str, address: str, state: str, timeout: float = 30) -> dict:
    """The instance's listing once every answer agrees it is in ``state``."""
    def agreed():
        view = one_view(gateway, service, address)
        return view if view and view["state"] == state else None
    return wait_for(agreed, timeout, what=f"{address} {state}, in every worker's listing")


class Checked(Recorder):
    """An upstream whose ``/healthz`` answers the server's ``health_status``."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/healthz":
            self.server.seen.append({"method": "GET", "path": self.path})
            self._send(self.server.health_status, b"health")
        else:
            self.handle_one()


def test_active_check_failure_is_one_view_and_the_instance_recovers(gateway):
    policy = {"health_check": {"path": "/healthz", "interval": 0.3, "timeout": 0.2,
                               "healthy_threshold": 1, "unhealthy_threshold": 1}}
    token = bearer()
    with UpstreamServer() as checked:
        checked.RequestHandlerClass = Checked
        checked.health_status = 200
        address = checked.address
        instance_id = register(gateway, "svc", address)
        response = requests.put(gateway.url + "/_gateway/services/svc/policy", json=policy,
                                headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert response.status_code == 201
        gateway.wait_routable("/svc/", token)
        wait_state(gateway, "svc", address, "healthy")
        # one worker probes per interval, not each of the three: about one probe per 0.3 s
        before, started = len(checked.seen), time.monotonic()
        time.sleep(1.5)  # the behaviour under test is a rate: count over a fixed time
        probes = sum(1 for s in checked.seen[before:] if s["path"] == "/healthz")
        assert 0 < probes <= (time.monotonic() - started) / 0.3 + 2, probes

        # the instance fails its checks: it is taken out in every worker
        checked.health_status = 500
        view = wait_state(gateway, "svc", address, "ejected")
        assert view["health"] == "unhealthy" and view["last_check"]["ok"] is False
        assert view["last_cause"] == "probe: HTTP 500"
        # The listing reads the shared view; each worker routes from its own copy of it,
        # refreshed a moment later: so wait for every worker to refuse, not just one.
        gateway.wait_routable("/svc/", token, status=503)

        # still probed while out, so it comes back
        checked.health_status = 200
        view = wait_state(gateway, "svc", address, "healthy")
        assert view["last_check"]["ok"] is True and view["last_cause"] == "probe passed"
        gateway.wait_routable("/svc/", token)
    causes = [e["cause"] for e in events(gateway, "svc", instance_id)]
    assert causes == ["registered", "probe passed", "probe: HTTP 500", "probe passed"]


class Flaky(Recorder):
    """An upstream that answers the server's ``fail_status`` to everything when it is set."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.server.fail_status:
            self.server.seen.append({"method": "GET", "path": self.path})
            self._send(self.server.fail_status, b"failing")
        else:
            self.handle_one()


def test_an_ejection_by_one_worker_routes_every_worker_around_it(start_gateway, upstream):
    gateway = start_gateway(GATEWAY_WORKERS=3, GATEWAY_EJECTION_SECONDS=5,
                            GATEWAY_ADMIN_ALLOW=ELSEWHERE, GATEWAY_ADMIN_TOKEN=ADMIN)
    token = bearer()
    register(gateway, "svc", upstream.address)
    gateway.wait_routable("/svc/", token)
    with UpstreamServer() as flaky:
        flaky.RequestHandlerClass = Flaky
        flaky.fail_status = 503
        flaky_id = register(gateway, "svc", flaky.address)
        # 503s are answered (a GET is not retried on an answer) and counted over the workers
        statuses = []

        def ejected():
            statuses.append(gateway.fresh_get("/svc/", token).status_code)
            view = next(i for i in admin_get(gateway, "/_gateway/services/svc").json()[
                "instances"] if i["address"] == flaky.address)
            return view["state"] == "ejected" and view

        view = wait_for(ejected, 60, what="the ejection")
        assert statuses.count(503) >= 5 and view["last_cause"] == \
            "5 consecutive failures: HTTP 503"
        # every worker routes around it within the propagation bound (a second)
        wait_for(lambda: all(gateway.fresh_get("/svc/", token).status_code == 200
                             for _ in range(ANSWERS)), 1.0, interval=0.05,
                 what="every worker routing around the ejected instance")
        # it answers again: once the ejection is over it gets traffic back, in every worker
        flaky.fail_status = 0
        wait_state(gateway, "svc", flaky.address, "healthy")
        seen = len(flaky.seen)
        wait_for(lambda: gateway.fresh_get("/svc/", token).status_code == 200
                 and len(flaky.seen) > seen + ANSWERS, 30, what="traffic to it again")
    assert [e["cause"] for e in events(gateway, "svc", flaky_id)] == [
        "registered", "5 consecutive failures: HTTP 503", "request succeeded after ejection"]


def test_in_flight_requests_are_counted_over_workers(gateway, upstream):
    register(gateway, "svc", upstream.address)
    token = bearer()
    gateway.wait_routable("/svc/", token)
    slow = threading.Thread(target=gateway.fresh_get, args=("/svc/slow/4", token))
    slow.start()
    wait_for(lambda: any(s["path"] == "/slow/4" for s in upstream.seen), 30,
             what="the slow request upstream")
    wait_for(lambda: all(v["in_flight"] == 1
                         for v in instance_views(gateway, "svc", upstream.address, 6)),
             PROPAGATION, interval=0.05, what="the request in flight, in every listing")
    slow.join(30)
    wait_for(lambda: all(v["in_flight"] == 0
                         for v in instance_views(gateway, "svc", upstream.address, 6)),
             PROPAGATION + 0.5, interval=0.05, what="no request in flight, in every listing")


def test_events_of_unknown_services_and_instances_are_json_404s(gateway, upstream):
    instance_id = register(gateway, "svc", upstream.address)
    missing = admin_get(gateway, "/_gateway/services/nope/instances/abc/events")
    assert missing.status_code == 404 and missing.json()["error"] == "service_not_found"
    missing = admin_get(gateway, "/_gateway/services/svc/instances/abc/events")
    assert missing.status_code == 404 and missing.json()["error"] == "instance_not_found"
    path = f"/_gateway/services/svc/instances/{instance_id}/events"
    refused = requests.get(gateway.url + path, timeout=10)  # loopback is not admin-allowed
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    drained = requests.put(gateway.url + f"/_gateway/services/svc/instances/{instance_id}/drain",
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert drained.status_code == 200
    assert [e["cause"] for e in events(gateway, "svc", instance_id)] == ["registered", "drained"]
    assert one_view(gateway, "svc", upstream.address)["state"] == "draining"
    register(gateway, "svc", upstream.address)  # again: back in rotation
    assert [e["cause"] for e in events(gateway, "svc", instance_id)][-1] == "re-registered"
    removed = requests.delete(gateway.url + f"/_gateway/services/svc/instances/{instance_id}",
                              headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert removed.status_code == 200
    register(gateway, "svc", f"http://127.0.0.1:{free_port()}")  # the service lives on
    assert admin_get(gateway, path).status_code == 404  # the timeline went with it
    register(gateway, "svc", upstream.address)
    assert [e["cause"] for e in events(gateway, "svc", instance_id)] == ["registered"]


def test_nodes_sharing_redis_share_one_health_view(start_gateway, space, tmp_path, upstream):
    env = {"GATEWAY_STORE": space.url, "GATEWAY_EJECTION_SECONDS": 30,
           "GATEWAY_ADMIN_ALLOW": ELSEWHERE, "GATEWAY_ADMIN_TOKEN": ADMIN}
    one = start_gateway(data_dir=tmp_path / "a", wait=False, **env)
    two = start_gateway(data_dir=tmp_path / "b", wait=False, **env)
    one.wait_ready()
    two.wait_ready()
    dead = f"http://127.0.0.1:{free_port()}"
    register(one, "svc", upstream.address)
    dead_id = register(one, "svc", dead)
    token = bearer()
    one.wait_routable("/svc/", token)
    two.wait_routable("/svc/", token)

    def ejected():
        for _ in range(4):  # traffic through the first node only
            one.fresh_get("/svc/", token)
        view = one_view(two, "svc", dead)  # seen by the second
        return view if view and view["state"] == "ejected" else None

    view = wait_for(ejected, 60, what="the ejection, in the other node's listing")
    assert view == one_view(one, "svc", dead)
    assert events(two, "svc", dead_id) == events(one, "svc", dead_id)
    assert events(two, "svc", dead_id)[-1]["cause"] == \
        "5 consecutive failures: connection refused"
