"""``GET /_gateway/metrics`` over real gunicorn with two workers and real loopback upstreams:
every scrape, whichever worker answers it, counts what all workers did, and stays fast and
bounded however often workers are replaced."""

from __future__ import annotations

import glob
import os
import signal
import statistics
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway_app.metrics import LockedMultiProcessCollector
from tests.conftest import make_token
from tests.support import RawServer, free_port, wait_for

ADMIN_TOKEN = "metrics-admin-token-for-the-test"


def scrape(gateway, headers: dict | None = None) -> dict:
    """One scrape on a new connection (so successive scrapes can land on either worker)."""
    response = gateway.fresh_get("/_gateway/metrics", headers)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def labelled(samples: dict, name: str, label: str) -> dict:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def metrics_dir(gateway) -> str:
    """The gateway's metric files: the directory holding its workers' in-flight gauges."""
    def find():
        pids = gateway.worker_pids()
        for directory in glob.glob(os.path.join(gateway.data_dir, "metrics-*")):
            if any(os.path.exists(os.path.join(directory, f"gauge_livesum_{pid}.db"))
                   for pid in pids):
                return directory
        return None

    return wait_for(find, 30, what="the gateway's metrics directory")


def register(gateway, name: str, address: str) -> None:
    assert gateway.register(name, address).status_code in (200, 201)


def test_every_scrape_counts_the_requests_of_all_workers(gateway, upstream, auth):
    register(gateway, "svc", upstream.address)
    # (the waits get 204s: every GET answered 200 below is one of the 40)
    gateway.wait_routable("/svc/status/204", auth, 204)
    directory = metrics_dir(gateway)
    pids = gateway.worker_pids()
    assert len(pids) == 2
    before = 0
    for _ in range(40):  # new connections: the kernel spreads them over both workers
        assert gateway.fresh_get("/svc/json", auth).status_code == 200
    # both workers served some: each has a counter file of its own (written at its next flush)
    wait_for(lambda: all(os.path.exists(os.path.join(directory, f"counter_{pid}.db"))
                         for pid in pids), 30, what="both workers' counter files")
    # within a flush interval every worker's requests are in any scrape, and stay there
    wait_for(lambda: value(scrape(gateway), "gateway_requests_total", service="svc",
                           method="GET", code="200") == before + 40, 30,
             what="40 more requests counted")
    for _ in range(6):
        samples = scrape(gateway)
        assert value(samples, "gateway_requests_total", service="svc", method="GET",
                     code="200") == before + 40
        assert value(samples, "gateway_response_bytes_total", service="svc") >= 40 * 21
        assert value(samples, "gateway_request_duration_seconds_count",
                     service="svc") >= before + 40
        assert value(samples, "gateway_registry_services") == 1
        assert value(samples, "gateway_store_up") == 1
    # the bytes in, from either worker
    for _ in range(10):
        assert requests.post(gateway.url + "/svc/echo", data=b"z" * 1000,
                             headers={**auth, "Connection": "close"},
                             timeout=10).status_code == 200
    wait_for(lambda: value(scrape(gateway), "gateway_request_bytes_total",
                           service="svc") == 10_000, 30, what="10,000 bytes in counted")


def test_metrics_are_refused_where_the_registry_api_is(start_gateway):
    gateway = start_gateway(GATEWAY_ADMIN_ALLOW="192.0.2.0/24", GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN)
    for path in ("/_gateway/metrics", "/_gateway/services"):
        refused = gateway.fresh_get(path)
        assert refused.status_code == 401, path
        assert refused.json()["error"] == "unauthorized"
    wait_for(lambda: value(scrape(gateway, {"Authorization": f"Bearer {ADMIN_TOKEN}"}),
                           "gateway_requests_total", service="_other", method="GET",
                           code="401") >= 2, 30, what="the two 401s counted")


def test_upstream_failures_are_counted_by_kind(start_gateway, upstream, auth):
    gateway = start_gateway(GATEWAY_ADMIN_ALLOW="127.0.0.0/8")
    with RawServer("reset") as reset, RawServer("garbage") as garbage:
        register(gateway, "closed", f"http://127.0.0.1:{free_port()}")  # nothing listens
        register(gateway, "resets", reset.address)
        register(gateway, "garbles", garbage.address)
        register(gateway, "slow", upstream.address)
        register(gateway, "cut", upstream.address)
        response = requests.put(gateway.url + "/_gateway/services/slow/policy",
                                json={"read_timeout": 0.3}, timeout=5)
        assert response.status_code == 201
        gateway.wait_routable("/closed/", auth, 502)
        gateway.wait_routable("/resets/", auth, 502)
        gateway.wait_routable("/garbles/", auth, 502)
        gateway.wait_routable("/slow/slow/2", auth, 504)
        # cut short: before the answer starts (a small body, read whole first: 502), and
        # after it started (a large one, streamed: the client's connection is cut)
        gateway.wait_routable("/cut/truncate-small", auth, 502)
        for _ in range(4):
            try:
                gateway.fresh_get("/cut/truncate", auth)  # (reads the body: raises)
            except requests.RequestException:
                pass

        def answered() -> dict | None:
            samples = scrape(gateway)
            return samples if value(samples, "gateway_requests_total", service="cut",
                                    method="GET", code="200") >= 4 else None

        samples = wait_for(answered, 30, what="the 4 cut answers counted")
    assert set(labelled(samples, "gateway_upstream_errors_total", "kind")) == {
        "refused", "reset", "protocol", "timeout"}
    for service, kind in (("closed", "refused"), ("resets", "reset"),
                          ("garbles", "protocol"), ("slow", "timeout")):
        assert value(samples, "gateway_upstream_errors_total", service=service,
                     kind=kind) >= 1, (service, kind)
    # 8 502s in a row for the small body, and the 4 cut after the answer started
    assert value(samples, "gateway_upstream_errors_total", service="cut", kind="reset") >= 12
    assert value(samples, "gateway_requests_total", service="cut", method="GET",
                 code="200") == 4
    assert value(samples, "gateway_requests_total", service="closed", method="GET",
                 code="502") >= 1


def test_token_refusals_and_rate_limit_refusals_are_counted_across_workers(gateway, upstream,
                                                                           auth):
    register(gateway, "svc", upstream.address)
    gateway.wait_routable("/svc/", auth)
    refusals = {
        "missing": {},
        "malformed": {"Authorization": "Bearer not.a.token"},
        "expired": {"Authorization": f"Bearer {make_token(ttl=-3600)}"},
        "bad_signature": {"Authorization": f"Bearer {make_token(secret='x' * 48)}"},
    }
    for headers in refusals.values():
        for _ in range(3):
            assert gateway.fresh_get("/svc/", headers).status_code == 401
    counted = labelled(scrape(gateway), "gateway_token_refusals_total", "reason")
    assert counted == {reason: 3 for reason in refusals}

    # a limit shared by the workers: 2 a minute, then 429s from either worker
    response = requests.put(gateway.url + "/_gateway/services/svc/policy",
                            json={"rate_limit": "2/minute"}, timeout=5)
    assert response.status_code == 201
    gateway.wait_routable("/svc/", auth, 429)  # (8 in a row, over both workers)

    def answers_counted() -> dict | None:
        # a refusal is counted as it is made, its answer at the worker's next flush
        samples = scrape(gateway)
        return samples if value(samples, "gateway_rate_limited_total", service="svc") == value(
            samples, "gateway_requests_total", service="svc", method="GET", code="429") else None

    samples = wait_for(answers_counted, 30, what="every 429 answer counted")
    assert value(samples, "gateway_rate_limited_total", service="svc") >= 8


def test_fifty_worker_restarts_keep_the_sums_and_leave_the_scrape_fast(start_gateway,
                                                                        upstream, auth):
    gateway = start_gateway()
    names = [f"svc{i}" for i in range(10)]  # a few hundred series
    for name in names:
        register(gateway, name, upstream.address)
    gateway.wait_routable(f"/{names[-1]}/", auth)  # (registered last: the others are too)

    def answered_200(samples: dict) -> float:
        return sum(value(samples, "gateway_requests_total", service=name, method="GET",
                         code="200") for name in names)

    directory = metrics_dir(gateway)
    restarts = 0

    def restart_workers() -> int:
        old = set(gateway.worker_pids())
        for pid in old:
            os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: len(set(gateway.worker_pids()) - old) >= 2, 60,
                     what="two new workers")
        except AssertionError as exc:  # (seen once under load: say what the master did)
            state = "running" if gateway.proc.poll() is None else f"exited {gateway.proc.poll()}"
            raise AssertionError(f"{exc} after {restarts} restarts; killed {sorted(old)}, now "
                                 f"{gateway.worker_pids()}; master {state}; log tail:\n"
                                 f"{gateway.log()[-4000:]}") from None
        gateway.wait_ready()
        return len(old)

    # The workers that served the waits above flush as they stop: what they counted is in.
    restarts += restart_workers()
    before = answered_200(scrape(gateway))
    answered = 0
    while restarts < 50:
        for i in range(4):
            try:
                response = gateway.fresh_get(f"/{names[(restarts + i) % 10]}/json", auth)
            except requests.RequestException:
                continue
            answered += response.status_code == 200
        restarts += restart_workers()
    samples = scrape(gateway)
    # every request answered before a restart is still counted, once (a stopping worker
    # flushes what it recorded)
    assert answered_200(samples) == before + answered
    # in flight: this scrape, and no dead worker's (the live workers' gauges are as of their
    # last flush, a ready probe perhaps among them, so within a flush interval)
    wait_for(lambda: value(scrape(gateway), "gateway_requests_in_flight") == 1, 30,
             what="one request in flight: the scrape")
    # bounded: three files per live worker (counters, histograms, in-flight) and two archives
    files = [f for f in os.listdir(directory) if f.endswith(".db")]
    assert len(files) <= 2 * 3 + 2, files
    assert {"counter_archive.db", "histogram_archive.db"} <= set(files)
    # and the scrape stays fast. What restarts could slow is reading the files, so that is
    # what is timed: the collector a scrape runs, over this directory, in CPU time (wall time
    # on a machine shared with other test processes says more about them than about this).
    collector = LockedMultiProcessCollector(directory)
    timings = []
    for _ in range(7):
        started = time.process_time()
        assert sum(len(metric.samples) for metric in collector.collect()) >= 100
        timings.append(time.process_time() - started)
    assert statistics.median(timings) < 0.1, timings
    assert len(samples) >= 300

    gateway.stop()  # and the files go with the gateway
    assert not os.path.exists(directory)


def test_metric_files_left_by_a_killed_gateway_go_at_the_next_start(start_gateway, tmp_path):
    first = start_gateway(data_dir=tmp_path / "shared")
    left = metrics_dir(first)
    first.kill9()  # no exit hook runs
    assert os.path.isdir(left)
    second = start_gateway(data_dir=tmp_path / "shared")
    assert metrics_dir(second) != left
    assert not os.path.exists(left)
