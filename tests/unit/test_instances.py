"""Many instances: balancing, passive ejection, panic, retries, active checks (unit level)."""

from __future__ import annotations

import collections
import time

import pytest
import requests
import responses

from gateway_app.balancing import smooth_schedule
from tests.support import wait_for

A, B, C = "http://a.test:1", "http://b.test:2", "http://c.test:3"


def gateway(make_app, addresses=(A, B, C), weights=None, policy=None, **env):
    app = make_app(**env)
    client = app.test_client()
    for i, address in enumerate(addresses):
        doc = {"name": "svc", "address": address}
        if weights:
            doc["weight"] = weights[i]
        assert client.post("/register_service", json=doc).status_code == 201
    if policy is not None:
        assert client.put("/_gateway/services/svc/policy", json=policy).status_code == 201
    return app, client


def hosts(upstream):
    return collections.Counter(call.request.url.split("/")[2] for call in upstream.calls)




def test_smooth_weighted_schedule():
    assert smooth_schedule([1, 1, 1]) == (0, 1, 2)
    assert smooth_schedule([5, 1, 1]) == (0, 0, 1, 0, 2, 0, 0)
    assert len(smooth_schedule([1000, 1000, 1000, 1000, 1000])) <= 4096


def test_round_robin_spreads_evenly_and_by_weight(make_app, upstream, auth):
    for host in (A, B, C):
        upstream.add(responses.GET, f"{host}/", body="ok")
    _, client = gateway(make_app)
    for _ in range(300):
        client.get("/svc", headers=auth)
    assert set(hosts(upstream).values()) == {100}
    upstream.calls.reset()
    _, weighted = gateway(make_app, weights=[3, 1, 1])
    for _ in range(500):
        weighted.get("/svc", headers=auth)
    assert hosts(upstream) == {"a.test:1": 300, "b.test:2": 100, "c.test:3": 100}


def test_random_honours_weights(make_app, upstream, auth):
    for host in (A, B):
        upstream.add(responses.GET, f"{host}/", body="ok")
    _, client = gateway(make_app, addresses=(A, B), weights=[4, 1],
                        policy={"balancing": "random"})
    for _ in range(1000):
        client.get("/svc", headers=auth)
    share = hosts(upstream)["a.test:1"] / 1000
    assert 0.72 < share < 0.88


def test_least_in_flight_prefers_the_idle_instance(make_app):
    app, _ = gateway(make_app, policy={"balancing": "least_in_flight"})
    registry = app.extensions["gateway"].registry
    registry.reload()
    service = registry.snapshot().services["svc"]
    busy = {i.address: i for i in service.instances}
    busy[A].health.in_flight = 3
    busy[B].health.in_flight = 1
    assert service.choose(time.time()).address == C
    busy[C].health.in_flight = 2
    assert service.choose(time.time()).address == B


def test_five_failures_eject_and_a_success_resets(make_app, upstream, monkeypatch, auth):
    upstream.add(responses.GET, f"{A}/", status=503)
    for host in (B, C):
        upstream.add(responses.GET, f"{host}/", body="ok")
    app, client = gateway(make_app)
    for _ in range(15):  # round robin: five each, five 503s for A
        client.get("/svc", headers=auth)
    listing = client.get("/_gateway/services/svc").get_json()["instances"]
    ejected = [i for i in listing if i["address"] == A][0]
    assert ejected["health"] == "unhealthy" and ejected["ejected_until"] is not None
    upstream.calls.reset()
    for _ in range(20):
        client.get("/svc", headers=auth)
    assert "a.test:1" not in hosts(upstream)
    # 30 s later it is tried again; a second run of failures ejects it for twice as long
    later = time.time() + 31
    monkeypatch.setattr(time, "time", lambda: later)
    upstream.calls.reset()
    for _ in range(30):
        client.get("/svc", headers=auth)
    assert hosts(upstream)["a.test:1"] == 5
    health = app.extensions["gateway"].registry.snapshot().services["svc"].instances[0].health
    assert 59 < health.ejected_until - later <= 60


def test_panic_threshold_routes_to_all_when_most_are_ejected(make_app, upstream, auth):
    for host in (A, B, C):
        upstream.add(responses.GET, f"{host}/fail", status=503)
        upstream.add(responses.GET, f"{host}/ok", body="ok")
    _, client = gateway(make_app)
    for _ in range(30):  # past two ejections, panic keeps spreading: the third goes too
        client.get("/svc/fail", headers=auth)
    listing = client.get("/_gateway/services/svc").get_json()["instances"]
    assert all(i["ejected_until"] for i in listing)
    response = client.get("/svc/ok", headers=auth)
    assert response.status_code == 200  # not 503 no_healthy_instance


def test_connect_failure_is_retried_on_another_instance_even_for_post(make_app, upstream, auth):
    upstream.add(responses.POST, f"{A}/", body=requests.ConnectionError(
        requests.packages.urllib3.exceptions.MaxRetryError(
            None, "/", requests.packages.urllib3.exceptions.NewConnectionError(
                None, "refused"))))
    upstream.add(responses.POST, f"{B}/", body="from b")
    upstream.add(responses.POST, f"{C}/", body="from c")
    _, client = gateway(make_app)
    response = client.post("/svc", data=b"order", headers=auth)
    assert response.status_code == 200 and response.data in (b"from b", b"from c")
    assert [c.request.body for c in upstream.calls] == [b"order", b"order"]


@pytest.mark.parametrize("method, headers, retried", [
    ("GET", {}, True), ("PUT", {}, True), ("DELETE", {}, True), ("POST", {}, False),
    ("PATCH", {}, False), ("POST", {"Idempotency-Key": "k-1"}, True),
])
def test_timeouts_are_retried_only_for_idempotent_requests(make_app, upstream, method,
                                                           headers, retried, auth):
    upstream.add(method, f"{A}/", body=requests.ReadTimeout("slow"))
    upstream.add(method, f"{B}/", body="from b")
    _, client = gateway(make_app, addresses=(A, B))
    response = client.open("/svc", method=method, data=b"x", headers={**auth, **headers})
    assert response.status_code == (200 if retried else 504)
    assert len(upstream.calls) == (2 if retried else 1)


def test_at_most_two_retries(make_app, upstream, auth):
    for host in (A, B, C, "http://d.test:4"):
        upstream.add(responses.GET, f"{host}/", body=requests.ReadTimeout("slow"))
    _, client = gateway(make_app, addresses=(A, B, C, "http://d.test:4"))
    assert client.get("/svc", headers=auth).status_code == 504
    assert len(upstream.calls) == 3


def test_large_bodies_are_not_replayed(make_app, upstream, auth):
    upstream.add(responses.PUT, f"{A}/", body=requests.ReadTimeout("slow"))
    upstream.add(responses.PUT, f"{B}/", body="from b")
    _, client = gateway(make_app, addresses=(A, B))
    response = client.put("/svc", data=b"x" * (64 * 1024 + 1), headers=auth)
    assert response.status_code == 504 and len(upstream.calls) == 1


def test_retry_budget_caps_retries_at_a_fifth_of_requests(monkeypatch):
    from gateway_app.retries import BUDGET_MINIMUM, RetryBudget

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    budget = RetryBudget()
    assert sum(budget.try_retry() for _ in range(50)) == BUDGET_MINIMUM  # a quiet start
    now[0] += 11  # a new window
    for _ in range(200):
        budget.request()
    assert sum(budget.try_retry() for _ in range(100)) == 40  # 20% of 200


@pytest.mark.parametrize("doc", [
    {"balancing": "fastest"}, {"health_check": {"path": "health"}},
    {"health_check": {"interval": 0}}, {"health_check": {"timeout": 20, "interval": 10}},
    {"health_check": {"healthy_threshold": 0}}, {"health_check": {"verb": "GET"}},
    {"health_check": {"path": "/../admin"}},
])
def test_bad_balancing_and_health_check_policies_are_400(make_app, doc):
    client = make_app().test_client()
    assert client.put("/_gateway/services/svc/policy", json=doc).status_code == 400


def test_active_check_admits_after_first_pass_and_recovers(make_app, upstream, auth):
    healthy = {"a.test:1": True}

    def health(request):
        return (200 if healthy["a.test:1"] else 500), {}, "ok"

    upstream.add_callback(responses.GET, f"{A}/healthz", callback=health)
    upstream.add(responses.GET, f"{A}/", body="from a")
    app, client = gateway(make_app, addresses=(A,), policy={"health_check": {
        "path": "/healthz", "interval": 0.2, "timeout": 0.1, "unhealthy_threshold": 1,
        "healthy_threshold": 1}})
    service = lambda: app.extensions["gateway"].registry.snapshot().services["svc"]  # noqa: E731
    wait_for(lambda: service().instances[0].health.probed, timeout=30, what="a first probe")
    assert client.get("/svc", headers=auth).status_code == 200
    healthy["a.test:1"] = False
    wait_for(lambda: not service().instances[0].health.check_ok, timeout=30, what="a failure")
    listing = client.get("/_gateway/services/svc").get_json()["instances"][0]
    assert listing["health"] == "unhealthy" and listing["last_check"]["status"] == 500
    healthy["a.test:1"] = True  # still probed while unhealthy, so it comes back
    wait_for(lambda: service().instances[0].health.check_ok, timeout=30, what="recovery")
    assert client.get("/svc", headers=auth).status_code == 200


def test_instance_is_kept_out_until_its_first_check_passes(make_app, upstream, auth):
    upstream.add(responses.GET, f"{A}/healthz", status=500)
    _, client = gateway(make_app, addresses=(A,), policy={"health_check": {
        "path": "/healthz", "interval": 5, "timeout": 1}})
    assert client.get("/svc", headers=auth).status_code == 503


def test_a_retry_needs_an_unsent_or_replayable_request_time_and_budget():
    from gateway_app.retries import MAX_RETRIES, RetryBudget, may_retry

    def budget():
        return RetryBudget()

    # Nothing reached the upstream: any request, even a streamed body with no byte sent.
    assert may_retry(True, False, 0, 0, 5.0, budget())
    # Something may have: only an idempotent request with its body kept (or none).
    assert may_retry(False, True, None, 0, 5.0, budget())
    assert not may_retry(False, False, None, 0, 5.0, budget())
    assert not may_retry(False, True, 10, 0, 5.0, budget())
    assert not may_retry(True, True, 10, 0, 5.0, budget())  # streamed bytes went up
    # Bounded by count, time and budget.
    assert not may_retry(True, True, None, MAX_RETRIES, 5.0, budget())
    assert not may_retry(True, True, None, 0, 0.01, budget())
    empty = RetryBudget(ratio=0.0, minimum=0)
    assert not may_retry(True, True, None, 0, 5.0, empty)
