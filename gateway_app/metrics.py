"""Prometheus metrics: recorded per request, merged across workers at scrape time.

Under gunicorn, ``gunicorn.conf.py`` points ``PROMETHEUS_MULTIPROC_DIR`` at a directory of
this gateway's own (made in the master before any worker forks, removed when it exits), and
prometheus_client then keeps each worker's counters, histograms and in-flight gauge in
memory-mapped files there; ``GET /_gateway/metrics`` merges them (its
:class:`~prometheus_client.multiprocess.MultiProcessCollector`), so any worker answers for all
of them. Without that variable (tests, a single process) the metrics live in the process.

prometheus_client never deletes the files of a worker that exited, and scrapes slow down as
they pile up. When a worker exits, the master folds its counter and histogram files into one
archive file per type and deletes them (:func:`retire_worker`): the sums are kept and the
directory holds a bounded number of files however often workers are replaced.

What the registry and health know (registry size, store reachability, each instance's health)
is read from the answering worker's snapshot at scrape time (:class:`StateCollector`): no write
per request, and series of instances that left disappear with them.

Labels are bounded: ``service`` is a registered service's name or :data:`OTHER` (unknown
names, the gateway's own paths), ``method`` one of the methods the gateway forwards or
:data:`OTHER`, ``code`` an HTTP status; no path is ever a label.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import platform
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from . import fastpaths

if TYPE_CHECKING:
    from .registry import Registry
    from .snapshot import Instance

log = logging.getLogger("gateway.metrics")

#: The environment variable prometheus_client reads (at import) to pick multiprocess mode.
DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: The one label value for everything that is not a registered service (or a known method).
OTHER = "_other"
#: Histogram buckets, in seconds: a gateway adds well under a millisecond to a fast upstream,
#: and the upstream timeouts go up to tens of seconds; 0.5 ms to 30 s, about 2.5x apart.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0)
#: Seconds between a worker's flushes of what its requests recorded into prometheus_client.
FLUSH_SECONDS = 1.0
#: Recorded requests past which the flusher is woken before its time (bounds the queue).
FLUSH_AT = 20_000
#: Methods that are label values as they are (the ones the proxy forwards).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The forwarder's error kinds (:func:`gateway_app.forwarding.upstream_error`) by label value;
#: any other kind is ``other``.
UPSTREAM_KINDS = {
    "connect_refused": "refused",
    "connect_timeout": "timeout",
    "timeout": "timeout",
    "reset": "reset",
    "aborted": "reset",
    "tls": "tls",
    "protocol": "protocol",
}
#: Reasons a token is refused (:class:`gateway_app.auth.InvalidToken` carries one, and a
#: missing token is ``missing``); anything else is ``other``.
TOKEN_REASONS = frozenset({
    "missing", "malformed", "too_long", "algorithm", "expired", "not_yet_valid",
    "bad_signature", "bad_issuer", "bad_audience", "missing_claim", "bad_claim",
    "unknown_kid", "keys_unavailable",
})
#: Services whose label children are kept ready; past it the table starts over (it is only a
#: shortcut: prometheus_client keeps the series).
MAX_CACHED_SERVICES = 4096
#: The file (beside the metric files, not a ``*.db``) a scrape holds shared and the master
#: holds exclusively while it folds a dead worker's files into the archive, so no scrape sees
#: a count twice or not at all.
LOCK_FILE = "merge.lock"
#: The worker-independent file types that :func:`retire_worker` folds into an archive.
ARCHIVED_TYPES = ("counter", "histogram")


def multiprocess_dir() -> str | None:
    """The directory of the workers' metric files, when prometheus_client was imported in
    multiprocess mode (``None`` otherwise: metrics live in this process)."""
    directory = os.environ.get(DIR_VARIABLE)
    if directory and getattr(values.ValueClass, "_multiprocess", False):
        return directory
    return None


class ServiceMetrics:
    """The label children of one ``service`` label, resolved once (a ``labels()`` call costs a
    lock and a dict lookup each time)."""

    __slots__ = ("label", "_requests", "requests", "duration", "upstream", "request_bytes",
                 "response_bytes")

    def __init__(self, metrics: Metrics, label: str) -> None:
        self.label = label
        self._requests = metrics.requests
        #: ``gateway_requests_total`` children by (method, code), made as they are met.
        self.requests: dict[tuple[str, int], Any] = {}
        self.duration = metrics.request_duration.labels(label)
        self.upstream = metrics.upstream_duration.labels(label)
        self.request_bytes = metrics.request_bytes.labels(label)
        self.response_bytes = metrics.response_bytes.labels(label)

    def counter(self, method: str, code: int) -> Any:
        key = (method, code)
        child = self.requests.get(key)
        if child is None:
            child = self._requests.labels(self.label, method, str(code))
            self.requests[key] = child
        return child


class _Batch:
    """What one flush adds for one ``service`` label: counts by (method, code), byte sums, and
    the two histograms' observations."""

    __slots__ = ("counts", "request_bytes", "response_bytes", "durations", "upstream")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.request_bytes = 0
        self.response_bytes = 0
        self.durations: list[float] = []
        self.upstream: list[float] = []


class Metrics:
    """This worker's metrics, and the scrape of all workers' (``app.extensions["gateway"]``
    holds one as ``metrics``).

    A request thread records a finished request by appending one tuple to a queue (a
    ``deque``: appending takes no lock of ours); a flusher thread adds the queue to
    prometheus_client's values every :data:`FLUSH_SECONDS` (each value written there costs a
    process-wide lock and a write to a shared file, eight of them a request otherwise). A
    scrape flushes the answering worker first, and a stopping worker flushes what is left
    (:meth:`close`), so a worker's counts reach a scrape within a flush interval, as Envoy's
    statistics reach its sinks within its ``stats_flush_interval``."""

    def __init__(self, registry: Registry, version: str = "unknown",
                 directory: str | None = None, batched_histograms: bool = False) -> None:
        self._registry = registry
        self.directory = directory if directory is not None else multiprocess_dir()
        # In multiprocess mode the values live in files, and the scrape reads the files: the
        # metric objects belong to no registry. Otherwise they are this registry's own.
        own = None if self.directory else CollectorRegistry()
        self.requests = Counter("gateway_requests", "Requests answered, by service, method "
                                "and status code", ["service", "method", "code"], registry=own)
        self.request_duration = Histogram(
            "gateway_request_duration_seconds", "Time from the request's arrival to the end "
            "of its response", ["service"], buckets=BUCKETS, registry=own)
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds", "Time from sending to an upstream to its "
            "response head", ["service"], buckets=BUCKETS, registry=own)
        self.request_bytes = Counter("gateway_request_bytes", "Request body bytes sent "
                                     "upstream", ["service"], registry=own)
        self.response_bytes = Counter("gateway_response_bytes", "Response body bytes sent to "
                                      "clients", ["service"], registry=own)
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being handled",
                               multiprocess_mode="livesum", registry=own)
        self.upstream_errors = Counter("gateway_upstream_errors", "Failed exchanges with "
                                       "upstream instances, by kind", ["service", "kind"],
                                       registry=own)
        self.retries = Counter("gateway_retries", "Requests tried again on another instance",
                               ["service"], registry=own)
        self.ejections = Counter("gateway_ejections", "Instances ejected after failures in "
                                 "a row", ["service"], registry=own)
        self.rate_limited = Counter("gateway_rate_limited", "Requests refused with 429 by a "
                                    "rate limit", ["service"], registry=own)
        self.token_refusals = Counter("gateway_token_refusals", "Requests refused for their "
                                      "token, by reason", ["reason"], registry=own)
        self._services: dict[str, ServiceMetrics] = {}
        #: Recorded, not yet flushed: ``None`` for an arrival, a tuple for a finished request.
        self._pending: deque[tuple[str, str, int, float, float | None, int, int] | None] = deque()
        self._append = self._pending.append
        self._in_flight = 0  # as of the last flush (only flushes touch it)
        self._flush_lock = threading.Lock()  # flushers only; request threads never take it
        self._add_observations = (fastpaths.histogram_batches if batched_histograms
                                  else _observe_each)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        scrape = own or CollectorRegistry()
        if self.directory:
            scrape.register(LockedMultiProcessCollector(self.directory))
        scrape.register(StateCollector(registry, version))
        #: What a scrape renders: every worker's files (or this process's metrics), and the
        #: state of the registry.
        self.scrape_registry = scrape

    # -- recording (request threads) ---------------------------------------------------------

    def label(self, name: str) -> str:
        """``name`` when it is a registered service, else :data:`OTHER`."""
        return name if name in self._registry.snapshot().services else OTHER

    def service(self, name: str) -> ServiceMetrics:
        """The label children for service ``name`` (already known to be a label value)."""
        found = self._services.get(name)
        if found is None:
            if len(self._services) >= MAX_CACHED_SERVICES:
                self._services = {}
            found = self._services[name] = ServiceMetrics(self, name)
        return found

    def started(self) -> None:
        """A request arrived."""
        self._append(None)

    def finished(self, view: Any, code: int, sent: int) -> None:
        """A request's response was closed after ``sent`` body bytes: count it, time it (at
        the next flush)."""
        name = view.service
        upstream_ms = view.upstream_ms
        self._append((
            name if view.policy is not None and name in self._registry.snapshot().services
            else OTHER,
            view.method, code, perf_counter() - view.start,
            None if upstream_ms is None else upstream_ms / 1000, view.request_bytes, sent))
        if len(self._pending) > FLUSH_AT:
            self._wake.set()

    # -- flushing (the flusher thread, a scrape, a stopping worker) ---------------------------

    def start(self) -> None:
        """Start this worker's flusher thread (once)."""
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._run, name="gateway-metrics",
                                             daemon=True)
            self._flusher.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a failed flush must not end the thread
                log.exception("metrics: flush failed")

    def close(self) -> None:
        """Stop the flusher and add what is left (a worker stopping)."""
        self._stop.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(5)
        self.flush()

    def flush(self) -> None:
        """Add what was recorded since the last flush to prometheus_client's values."""
        with self._flush_lock:
            pending = self._pending
            count = len(pending)  # only these: requests finishing meanwhile go next time
            if not count:
                return
            in_flight = self._in_flight
            batches: dict[str, _Batch] = {}
            popleft = pending.popleft
            for _ in range(count):
                record = popleft()
                if record is None:
                    in_flight += 1
                    continue
                in_flight -= 1
                label, method, code, seconds, upstream, request_bytes, sent = record
                batch = batches.get(label)
                if batch is None:
                    batch = batches[label] = _Batch()
                key = (method if method in METHODS else OTHER, code)
                batch.counts[key] = batch.counts.get(key, 0) + 1
                batch.durations.append(seconds)
                if upstream is not None:
                    batch.upstream.append(upstream)
                batch.request_bytes += request_bytes or 0
                batch.response_bytes += sent
            if in_flight != self._in_flight:
                self._in_flight = in_flight
                self.in_flight.set(in_flight)
            add = self._add_observations
            for label, batch in batches.items():
                children = self.service(label)
                for (method, code), n in batch.counts.items():
                    children.counter(method, code).inc(n)
                add(children.duration, batch.durations)
                if batch.upstream:
                    add(children.upstream, batch.upstream)
                if batch.request_bytes:
                    children.request_bytes.inc(batch.request_bytes)
                if batch.response_bytes:
                    children.response_bytes.inc(batch.response_bytes)

    def upstream_failed(self, service: str, kind: str) -> None:
        self.upstream_errors.labels(self.label(service), UPSTREAM_KINDS.get(kind, "other")).inc()

    def retried(self, service: str) -> None:
        self.retries.labels(self.label(service)).inc()

    def ejected(self, service: str) -> None:
        self.ejections.labels(self.label(service)).inc()

    def limited(self, service: str) -> None:
        """A request refused with 429 by a rate limit (``service`` as sent: unknown names
        count under :data:`OTHER`)."""
        self.rate_limited.labels(self.label(service)).inc()

    def token_refused(self, reason: str) -> None:
        self.token_refusals.labels(reason if reason in TOKEN_REASONS else "other").inc()

    # -- scraping ----------------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition of every worker's metrics, in the format ``accept`` asks for
        (Prometheus text unless it asks for OpenMetrics), and its content type."""
        self.flush()  # this worker's own counts, as of now
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.scrape_registry), content_type


def _observe_each(histogram: Any, values: list[float]) -> None:
    """The stock way: one ``observe`` a value (:func:`gateway_app.fastpaths.histogram_batches`
    adds them per bucket)."""
    observe = histogram.observe
    for value in values:
        observe(value)


class LockedMultiProcessCollector:
    """prometheus_client's multiprocess merge, holding :data:`LOCK_FILE` shared while it reads
    the files (the master holds it exclusively while it folds a dead worker's files in)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        with _locked(self.directory, fcntl.LOCK_SH):
            files = glob.glob(os.path.join(self.directory, "*.db"))
            return list(MultiProcessCollector.merge(files, accumulate=True))


class StateCollector:
    """What the answering worker's registry snapshot says, at scrape time: registry size,
    store reachability, each instance's health, and the build."""

    def __init__(self, registry: Registry, version: str) -> None:
        self._registry = registry
        self._build = (version, platform.python_version())

    def collect(self) -> Iterator[Metric]:
        registry = self._registry
        snapshot = registry.snapshot()
        now = registry.now()
        services = GaugeMetricFamily("gateway_registry_services", "Services in the registry")
        services.add_metric([], len(snapshot.services))
        instances = GaugeMetricFamily("gateway_registry_instances", "Instances in the registry")
        healthy = GaugeMetricFamily(
            "gateway_instance_healthy", "1 when the instance takes traffic (lease valid, not "
            "draining, not ejected, passing its active check if it has one), else 0",
            labels=["service", "instance"])
        count = 0
        for name in snapshot.names:
            for instance in snapshot.services[name].instances:
                count += 1
                healthy.add_metric([name, instance.id], 1 if _takes_traffic(instance, now) else 0)
        instances.add_metric([], count)
        store = GaugeMetricFamily("gateway_store_up", "1 while the registry's store answers, "
                                  "else 0")
        store.add_metric([], 1 if registry.store_answers() else 0)
        build = GaugeMetricFamily("gateway_build_info", "The gateway's version and Python's",
                                  labels=["version", "python"])
        build.add_metric(list(self._build), 1)
        yield from (services, instances, healthy, store, build)


def _takes_traffic(instance: Instance, now: float) -> bool:
    health = instance.health
    return (instance.live(now) and health.ejected_until <= now
            and (not instance.has_check or health.check_ok))


# -- the master's side -------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: str, how: int) -> Iterator[None]:
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def retire_worker(directory: str, pid: int) -> None:
    """Fold the counter and histogram files of worker ``pid`` (which exited) into
    ``counter_archive.db`` and ``histogram_archive.db``, and remove every file of it, its
    live gauges included. Run by the master from gunicorn's ``child_exit`` hook.

    The values are added key by key (a key is one series: metric, labels, bucket), which is
    what the scrape does across files anyway, so every sum is the same before and after. A
    file that cannot be read (a worker killed while adding a series) is dropped, logged."""
    with _locked(directory, fcntl.LOCK_EX):
        for typ in ARCHIVED_TYPES:
            path = os.path.join(directory, f"{typ}_{pid}.db")
            if not os.path.exists(path):
                continue
            try:
                found = [(key, value) for key, value, _, _ in
                         MmapedDict.read_all_values_from_file(path)]
            except (OSError, RuntimeError, ValueError, struct.error) as exc:
                log.warning("metrics: dropping worker %d's unreadable %s file: %s", pid, typ, exc)
                found = []
            if found:
                archive = MmapedDict(os.path.join(directory, f"{typ}_archive.db"))
                try:
                    for key, value in found:
                        old, _ = archive.read_value(key)
                        archive.write_value(key, old + value, 0.0)
                finally:
                    archive.close()
            os.remove(path)
        mark_process_dead(pid, directory)
        for path in glob.glob(os.path.join(directory, f"*_{pid}.db")):
            os.remove(path)  # gauges of other modes, should any appear


def worker_files(directory: str) -> list[str]:
    """The metric files in ``directory`` (for tests and diagnostics)."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.db")))

