"""Metrics at ``GET /_gateway/metrics``: names, labels, access, and the archive of dead
workers' files (in-process here; tests/integration/test_metrics_http.py runs real workers)."""

from __future__ import annotations

import os
import random
import string

import pytest
import responses
from flask.testing import FlaskClient
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway_app.metrics import BUCKETS, OTHER, retire_worker, worker_files
from tests.conftest import make_token

UPSTREAM = "http://127.0.0.1:9"


class ClosingClient(FlaskClient):
    """A test client that reads each response whole and closes it, as a server does: the
    metrics (and the access log) record a request when its response is closed."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture
def make_client(make_app):
    def make(**overrides):
        app = make_app(**overrides)
        app.test_client_class = ClosingClient
        return app.test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


def scrape(client, **kwargs) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of one scrape: (name, sorted labels) -> value."""
    response = client.get("/_gateway/metrics", **kwargs)
    assert response.status_code == 200, response.data
    assert response.content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples, prefix: str = "gateway_") -> set:
    return {key for key in samples if key[0].startswith(prefix)}


@pytest.fixture
def svc(client, upstream):
    upstream.add(responses.GET, f"{UPSTREAM}/hello", body=b"x" * 100)
    upstream.add(responses.POST, f"{UPSTREAM}/hello", body=b"ok")
    assert client.post("/register_service", data=f"svc,{UPSTREAM}").status_code == 201
    return "svc"


def test_requests_are_counted_by_service_method_and_code_with_bytes_and_durations(
        client, svc, auth):
    for _ in range(3):
        assert client.get("/svc/hello", headers=auth).status_code == 200
    assert client.post("/svc/hello", headers=auth, data=b"y" * 50).status_code == 200
    assert client.get("/nosuch/x", headers=auth).status_code == 404
    samples = scrape(client)
    assert value(samples, "gateway_requests_total", service="svc", method="GET",
                 code="200") == 3
    assert value(samples, "gateway_requests_total", service="svc", method="POST",
                 code="200") == 1
    assert value(samples, "gateway_requests_total", service=OTHER, method="GET",
                 code="404") == 1
    assert value(samples, "gateway_request_duration_seconds_count", service="svc") == 4
    assert value(samples, "gateway_upstream_duration_seconds_count", service="svc") == 4
    assert value(samples, "gateway_response_bytes_total", service="svc") == 3 * 100 + 2
    assert value(samples, "gateway_request_bytes_total", service="svc") == 50
    # the buckets, 0.5 ms to 30 s
    les = {dict(labels)["le"] for name, labels in samples
           if name == "gateway_request_duration_seconds_bucket"}
    assert les == {str(float(b)) for b in BUCKETS} | {"+Inf"}
    # this scrape is the one request in flight
    assert value(samples, "gateway_requests_in_flight") == 1


def test_registry_size_store_health_and_build_are_read_at_scrape_time(client, svc):
    assert client.post("/register_service", data="svc,http://127.0.0.1:10").status_code == 201
    samples = scrape(client)
    assert value(samples, "gateway_registry_services") == 1
    assert value(samples, "gateway_registry_instances") == 2
    assert value(samples, "gateway_store_up") == 1
    healthy = {dict(labels)["instance"]: v for (name, labels), v in samples.items()
               if name == "gateway_instance_healthy"}
    assert len(healthy) == 2 and set(healthy.values()) == {1.0}
    build = [dict(labels) for name, labels in samples if name == "gateway_build_info"]
    assert len(build) == 1 and set(build[0]) == {"version", "python"}

    # a drained instance takes no traffic: 0; a removed one has no series any more
    drained, removed = sorted(healthy)
    assert client.put(f"/_gateway/services/svc/instances/{drained}/drain").status_code == 200
    assert client.delete(f"/_gateway/services/svc/instances/{removed}").status_code == 200
    samples = scrape(client)
    assert {dict(labels)["instance"]: v for (name, labels), v in samples.items()
            if name == "gateway_instance_healthy"} == {drained: 0.0}
    assert value(samples, "gateway_registry_instances") == 1


def test_metrics_have_the_registry_apis_access_rule(make_client):
    client = make_client(GATEWAY_ADMIN_TOKEN="an-admin-token-for-the-test")
    outsider = {"REMOTE_ADDR": "203.0.113.7"}
    for path in ("/_gateway/metrics", "/_gateway/services"):
        refused = client.get(path, environ_base=outsider)
        assert refused.status_code == 401
        assert refused.get_json()["error"] == "unauthorized"
    allowed = client.get("/_gateway/metrics", environ_base=outsider,
                         headers={"Authorization": "Bearer an-admin-token-for-the-test"})
    assert allowed.status_code == 200 and b"gateway_requests_total" in allowed.data
    # a registration credential may register its services, not read the metrics
    minted = client.post("/_gateway/registration-tokens", json={"services": ["svc"]})
    credential = minted.get_json()["token"]
    assert client.get("/_gateway/metrics", environ_base=outsider,
                      headers={"Authorization": f"Bearer {credential}"}).status_code == 403


def test_openmetrics_is_served_when_asked_for(client):
    response = client.get("/_gateway/metrics",
                          headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.get_data(as_text=True).rstrip().endswith("# EOF")


def test_ten_thousand_unknown_names_add_no_series(client, svc, auth):
    assert client.get("/svc/hello", headers=auth).status_code == 200
    client.get("/nosuch", headers=auth)
    client.get("/_gateway/nothing-here")
    scrape(client)  # (a scrape is counted too, from the next one on)
    before = series(scrape(client))
    rng = random.Random(14)
    for _ in range(10_000):
        name = "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))
        assert client.get(f"/{name}/{name}", headers=auth).status_code == 404
    after = scrape(client)
    assert series(after) == before
    assert value(after, "gateway_requests_total", service=OTHER, method="GET",
                 code="404") == 10_002  # and the two before


def test_methods_outside_the_forwarded_set_are_one_label(client, auth):
    client.open("/svc/x", method="PROPFIND", headers=auth)
    client.open("/svc/x", method="BREW", headers=auth)
    samples = scrape(client)
    methods = {dict(labels)["method"] for name, labels in samples
               if name == "gateway_requests_total"}
    assert methods == {OTHER}


@pytest.mark.parametrize(("headers", "reason"), [
    ({}, "missing"),
    ({"Authorization": "Bearer not-a-jwt"}, "malformed"),
    ({"Authorization": f"Bearer {make_token(ttl=-3600)}"}, "expired"),
    ({"Authorization": f"Bearer {make_token(secret='another-secret-' + 'x' * 40)}"},
     "bad_signature"),
    ({"Authorization": f"Bearer {make_token(nbf=4102444800)}"}, "not_yet_valid"),
])
def test_token_refusals_are_counted_by_reason(client, svc, headers, reason):
    assert client.get("/svc/hello", headers=headers).status_code == 401
    assert client.get("/unknown/x", headers=headers).status_code == 401
    samples = scrape(client)
    refusals = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
                if name == "gateway_token_refusals_total"}
    assert refusals == {reason: 2}


def test_rate_limit_refusals_are_counted_per_service(client, svc, auth):
    assert client.put("/_gateway/services/svc/policy",
                      json={"rate_limit": "2/minute"}).status_code == 201
    codes = [client.get("/svc/hello", headers=auth).status_code for _ in range(5)]
    assert codes == [200, 200, 429, 429, 429]
    samples = scrape(client)
    assert value(samples, "gateway_rate_limited_total", service="svc") == 3
    assert value(samples, "gateway_requests_total", service="svc", method="GET",
                 code="429") == 3


def test_upstream_failures_retries_and_ejections_are_counted(client, auth, upstream):
    import requests

    other = "http://127.0.0.1:10"
    upstream.add(responses.GET, f"{UPSTREAM}/x", body=requests.ConnectionError("refused"))
    upstream.add(responses.GET, f"{other}/x", body=b"fine")
    for address in (UPSTREAM, other):
        assert client.post("/register_service", data=f"two,{address}").status_code == 201
    codes = [client.get("/two/x", headers=auth).status_code for _ in range(12)]
    assert set(codes) == {200}  # each failure went to the other instance
    samples = scrape(client)
    failures = sum(v for (name, _), v in samples.items()
                   if name == "gateway_upstream_errors_total")
    assert failures >= 5
    assert value(samples, "gateway_retries_total", service="two") == failures
    assert value(samples, "gateway_ejections_total", service="two") == 1


# -- the archive of dead workers' files --------------------------------------------------------


def _write(path, entries):
    file = MmapedDict(str(path))
    for key, amount in entries:
        old, _ = file.read_value(key)
        file.write_value(key, old + amount, 0.0)
    file.close()


def _merged(directory) -> dict:
    files = [os.path.join(directory, f) for f in worker_files(directory)]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in MultiProcessCollector.merge(files) for s in metric.samples}


def test_a_dead_workers_files_are_folded_into_the_archive_with_every_sum_kept(tmp_path):
    requests_a = mmap_key("gateway_requests", "gateway_requests_total",
                          ["service", "method", "code"], ["svc", "GET", "200"], "h")
    requests_b = mmap_key("gateway_requests", "gateway_requests_total",
                          ["service", "method", "code"], ["_other", "GET", "404"], "h")
    bucket = mmap_key("gateway_request_duration_seconds",
                      "gateway_request_duration_seconds_bucket", ["service", "le"],
                      ["svc", "0.005"], "h")
    total = mmap_key("gateway_request_duration_seconds",
                     "gateway_request_duration_seconds_sum", ["service"], ["svc"], "h")
    in_flight = mmap_key("gateway_requests_in_flight", "gateway_requests_in_flight", [], [],
                         "h")
    for pid, n in ((101, 3), (102, 5)):
        _write(tmp_path / f"counter_{pid}.db", [(requests_a, n), (requests_b, 1)])
        _write(tmp_path / f"histogram_{pid}.db", [(bucket, n), (total, 0.001 * n)])
        _write(tmp_path / f"gauge_livesum_{pid}.db", [(in_flight, 2)])
    before = _merged(tmp_path)

    retire_worker(str(tmp_path), 101)
    assert worker_files(tmp_path) == ["counter_102.db", "counter_archive.db",
                                      "gauge_livesum_102.db", "histogram_102.db",
                                      "histogram_archive.db"]
    after = _merged(tmp_path)
    in_flight_key = ("gateway_requests_in_flight", ())
    assert after.pop(in_flight_key) == 2  # the dead worker's requests are no longer in flight
    assert before.pop(in_flight_key) == 4
    assert after == before

    # more of them: the file count stays, the sums add up
    for pid in range(103, 153):
        _write(tmp_path / f"counter_{pid}.db", [(requests_a, 1)])
        _write(tmp_path / f"histogram_{pid}.db", [(bucket, 1), (total, 0.001)])
        retire_worker(str(tmp_path), pid)
    assert len(worker_files(tmp_path)) == 5
    merged = _merged(tmp_path)
    labels = (("code", "200"), ("method", "GET"), ("service", "svc"))
    assert merged[("gateway_requests_total", labels)] == 3 + 5 + 50
    assert merged[("gateway_request_duration_seconds_count", (("service", "svc"),))] == 58


def test_an_unreadable_file_of_a_dead_worker_is_dropped_not_kept(tmp_path):
    (tmp_path / "counter_77.db").write_bytes(b"\xff\xff\x00\x00" + b"\x00" * 60)
    retire_worker(str(tmp_path), 77)
    assert worker_files(tmp_path) == []


def test_store_up_follows_the_watchers_last_call():
    from gateway_app.metrics import Metrics
    from gateway_app.registry import Registry
    from tests.unit.test_registry import FlakyStore

    store = FlakyStore()
    registry = Registry(store, refresh_interval=60)  # the test steps the watcher itself
    try:
        metrics = Metrics(registry)

        def store_up() -> float:
            body, _ = metrics.render(None)
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(body.decode())
                       for s in family.samples}
            return value(samples, "gateway_store_up")

        assert store_up() == 1
        store.down = True
        registry.watch_step()
        assert store_up() == 0
        store.down = False
        registry.watch_step()
        assert store_up() == 1
    finally:
        registry.close()


# -- recording is batched: a request appends, a flush writes ------------------------------------


class _View:
    """What :meth:`Metrics.finished` reads of a request's view."""

    def __init__(self, service: str = "svc", method: str = "GET", upstream_ms: float = 2.0,
                 request_bytes: int = 0) -> None:
        import time

        self.service, self.method, self.policy = service, method, object()
        self.start = time.perf_counter()
        self.upstream_ms, self.request_bytes = upstream_ms, request_bytes


@pytest.fixture
def bare_metrics():
    """A :class:`Metrics` over a registry that knows one service, ``svc``, flushed by hand."""
    from types import SimpleNamespace

    from gateway_app.metrics import Metrics

    snapshot = SimpleNamespace(services={"svc": None}, names=[])
    registry = SimpleNamespace(snapshot=lambda: snapshot, now=lambda: 0.0,
                               store_answers=lambda: True)
    return Metrics(registry)  # type: ignore[arg-type]


def samples_of(metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.scrape_registry.collect() for s in family.samples}


def test_a_request_is_written_at_the_next_flush_not_before(bare_metrics):
    metrics = bare_metrics
    for _ in range(3):
        metrics.started()
    for _ in range(2):
        metrics.finished(_View(request_bytes=7), 200, 40)
    metrics.finished(_View(service="nosuch", method="BREW"), 404, 9)
    metrics.started()  # still in flight at the flush
    assert value(samples_of(metrics), "gateway_requests_total", service="svc", method="GET",
                 code="200") == 0
    metrics.flush()
    samples = samples_of(metrics)
    assert value(samples, "gateway_requests_total", service="svc", method="GET",
                 code="200") == 2
    assert value(samples, "gateway_requests_total", service=OTHER, method=OTHER,
                 code="404") == 1
    assert value(samples, "gateway_response_bytes_total", service="svc") == 80
    assert value(samples, "gateway_request_bytes_total", service="svc") == 14
    assert value(samples, "gateway_request_duration_seconds_count", service="svc") == 2
    assert value(samples, "gateway_upstream_duration_seconds_sum", service="svc") == 0.004
    assert value(samples, "gateway_requests_in_flight") == 1
    metrics.finished(_View(), 200, 0)
    metrics.flush()
    samples = samples_of(metrics)
    assert value(samples, "gateway_requests_in_flight") == 0
    assert value(samples, "gateway_requests_total", service="svc", method="GET",
                 code="200") == 3


def test_the_flusher_thread_writes_within_its_interval_and_close_writes_the_rest(bare_metrics):
    import threading

    from tests.support import wait_for

    metrics = bare_metrics
    metrics.start()
    try:
        def record(n: int) -> None:
            for _ in range(n):
                metrics.started()
                metrics.finished(_View(), 200, 1)

        threads = [threading.Thread(target=record, args=(500,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_for(lambda: value(samples_of(metrics), "gateway_requests_total", service="svc",
                               method="GET", code="200") == 4000, 30, what="the flusher")
        metrics.finished(_View(), 200, 1)
    finally:
        metrics.close()
    assert not metrics._flusher.is_alive()
    samples = samples_of(metrics)
    assert value(samples, "gateway_requests_total", service="svc", method="GET",
                 code="200") == 4001
    assert value(samples, "gateway_response_bytes_total", service="svc") == 4001


# -- the histogram_batches fast path against prometheus_client's own observe --------------------

#: Values on and around every bound, below the first and past the last.
_HISTOGRAM_VALUES = ([0.0, 1e-9, 0.0004999, 45.0, 1e9]
                     + [b * f for b in BUCKETS for f in (0.999999, 1.0, 1.000001)]
                     + [random.Random(7).lognormvariate(-5, 2) for _ in range(2000)])


def _histogram_samples(add, multiprocess_dir=None, monkeypatch=None) -> dict:
    from prometheus_client import CollectorRegistry, Histogram, values

    registry = CollectorRegistry()
    if multiprocess_dir is not None:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiprocess_dir))
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: 4242))
    histogram = Histogram("trial_seconds", "t", ["service"], buckets=BUCKETS,
                          registry=None if multiprocess_dir else registry)
    child = histogram.labels("svc")
    for start in range(0, len(_HISTOGRAM_VALUES), 300):  # in flushes
        add(child, _HISTOGRAM_VALUES[start:start + 300])
    if multiprocess_dir is not None:
        families = MultiProcessCollector(None, path=str(multiprocess_dir)).collect()
    else:
        families = registry.collect()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families for s in family.samples if not s.name.endswith("_created")}


@pytest.mark.parametrize("multiprocess", [False, True], ids=["in-process", "multiprocess"])
def test_histogram_batches_give_the_exposition_observe_gives(multiprocess, tmp_path,
                                                              monkeypatch):
    from gateway_app import fastpaths
    from gateway_app.metrics import _observe_each

    stock_dir = tmp_path / "stock"
    fast_dir = tmp_path / "fast"
    stock_dir.mkdir()
    fast_dir.mkdir()
    with monkeypatch.context() as patch:
        stock = _histogram_samples(_observe_each, stock_dir if multiprocess else None, patch)
    with monkeypatch.context() as patch:
        fast = _histogram_samples(fastpaths.histogram_batches,
                                  fast_dir if multiprocess else None, patch)
    assert len(stock) == len(BUCKETS) + 1 + 2  # buckets, +Inf, count, sum
    assert stock.keys() == fast.keys()
    for key, expected in stock.items():
        assert fast[key] == pytest.approx(expected, rel=1e-12), key


def test_histogram_batches_is_refused_for_a_prometheus_client_it_was_not_checked_against(
        monkeypatch):
    from gateway_app import fastpaths

    assert fastpaths._check_histogram_batches() is None  # the pinned one
    monkeypatch.setattr(fastpaths, "version", lambda name: "0.27.0")
    assert "not a release this was checked against" in fastpaths._check_histogram_batches()
