"""Instance health, per worker process: passive outlier ejection and active checks.

Passive (Envoy's outlier detection): an instance that fails :data:`EJECT_AFTER` times in a row
(connect error, timeout, 502/503/504) is ejected for 30 s, doubling with each ejection in a row
up to 300 s, then tried again; a success resets it.

Active (Kong's and Caddy's health checks): when a service's policy has a ``health_check``, one
thread per process probes its instances, a few at a time, through the forwarder that carries
the traffic (the same pools, TLS settings and address checks: an instance is probed as it is
reached). An instance of such a service takes traffic only after its first pass, and unhealthy
instances keep being probed, so they always recover.

The state lives in :class:`HealthTracker`, keyed by service and instance id, so it survives the
registry snapshots being replaced. Each worker process keeps its own view.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .clock import rfc3339
from .errors import GatewayError

if TYPE_CHECKING:
    from .forwarding import Forwarder
    from .registry import Registry

log = logging.getLogger("gateway.health")

#: Consecutive failures that eject an instance.
EJECT_AFTER = 5
#: First ejection, and the cap on the doubling (as multiples of it: 30 s up to 300 s).
BASE_EJECTION = 30.0
MAX_EJECTION_FACTOR = 10
#: Upstream statuses that count as failures of the instance.
FAILURE_STATUSES = frozenset({502, 503, 504})
#: Probes in flight at once, per process.
PROBE_CONCURRENCY = 4


class InstanceHealth:
    """What one process knows of one instance's health. Mutated under the tracker's lock."""

    __slots__ = ("consecutive_failures", "ejected_until", "ejections", "in_flight",
                 "checked", "check_ok", "check_passes", "check_failures", "last_check",
                 "next_probe", "probing", "last_success")

    def __init__(self) -> None:
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.in_flight = 0
        #: Active checks: has a probe ever finished, and is the instance passing?
        self.checked = False
        self.check_ok = False
        self.check_passes = 0
        self.check_failures = 0
        self.last_check: dict[str, Any] | None = None
        self.next_probe = 0.0
        self.probing = False
        self.last_success = 0.0

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "consecutive_failures": self.consecutive_failures,
            "ejected_until": rfc3339(self.ejected_until) if self.ejected_until > now else None,
            "in_flight": self.in_flight,
            "last_check": self.last_check,
        }


class HealthTracker:
    """Per-process health of every instance, and the bookkeeping around each request."""

    def __init__(self, ejection_seconds: float = BASE_EJECTION) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], InstanceHealth] = {}
        self.ejection_seconds = ejection_seconds

    def get(self, service: str, instance_id: str) -> InstanceHealth:
        key = (service, instance_id)
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:
                entry = self._entries.setdefault(key, InstanceHealth())
        return entry

    def forget(self, service: str, instance_ids: list[str]) -> None:
        """Forget instances of ``service`` that left the registry."""
        if instance_ids:
            with self._lock:
                for instance_id in instance_ids:
                    self._entries.pop((service, instance_id), None)

    def keep_only(self, keys: set[tuple[str, str]]) -> None:
        """Forget instances that left the registry (the state stays bounded)."""
        with self._lock:
            for key in [k for k in self._entries if k not in keys]:
                del self._entries[key]

    def started(self, health: InstanceHealth) -> None:
        with self._lock:
            health.in_flight += 1

    def finished(self, health: InstanceHealth) -> None:
        with self._lock:
            health.in_flight -= 1

    def succeeded(self, health: InstanceHealth, now: float) -> None:
        health.last_success = now
        if health.consecutive_failures or health.ejections:
            with self._lock:
                health.consecutive_failures = 0
                health.ejections = 0

    def failed(self, health: InstanceHealth, now: float, what: str) -> bool:
        """Count a failure; ``True`` when it ejected the instance."""
        with self._lock:
            health.consecutive_failures += 1
            if health.consecutive_failures < EJECT_AFTER or health.ejected_until > now:
                return False
            base = self.ejection_seconds
            seconds = min(base * MAX_EJECTION_FACTOR, base * 2 ** health.ejections)
            health.ejections += 1
            health.ejected_until = now + seconds
            health.consecutive_failures = 0
        log.warning("instance ejected for %.0f s after %d failures in a row (%s)",
                    seconds, EJECT_AFTER, what)
        return True

    def probed(self, health: InstanceHealth, ok: bool, detail: dict[str, Any],
               check: dict[str, Any], now: float) -> None:
        with self._lock:
            health.probing = False
            health.next_probe = now + check["interval"]
            health.last_check = {"time": detail.pop("time"), "ok": ok, **detail}
            if ok:
                health.check_passes += 1
                health.check_failures = 0
                health.ejected_until = 0.0  # a passing check lifts a passive ejection (Envoy)
                # the first pass admits a new instance; a failed one needs healthy_threshold
                if not health.checked or health.check_passes >= check["healthy_threshold"]:
                    health.check_ok = True
            else:
                health.check_failures += 1
                health.check_passes = 0
                if not health.checked or health.check_failures >= check["unhealthy_threshold"]:
                    health.check_ok = False
            health.checked = True


class ActiveChecker:
    """One thread per process that probes instances of services with a ``health_check``."""

    def __init__(self, registry: Registry, tracker: HealthTracker, forwarder: Forwarder,
                 tick: float = 0.2) -> None:
        self._registry = registry
        self._tracker = tracker
        self._tick = tick
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._forwarder = forwarder

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(PROBE_CONCURRENCY, thread_name_prefix="health-probe")
        self._thread = threading.Thread(target=self._run, name="health-checker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop probing; waits for probes in flight (each is bounded by its timeout)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            snapshot = self._registry.snapshot()
            now = time.time()
            for service in snapshot.services.values():
                check = service.health_check
                if check is None:
                    continue
                for instance in service.instances:
                    health = instance.health
                    if health.probing or health.next_probe > now or self._stop.is_set():
                        continue
                    health.probing = True
                    try:
                        assert self._pool is not None
                        self._pool.submit(self._probe, instance, health, check)
                    except RuntimeError:  # shutting down
                        return

    def _probe(self, instance: Any, health: InstanceHealth, check: dict[str, Any]) -> None:
        started = time.time()
        detail: dict[str, Any] = {"time": rfc3339(started)}
        try:
            status = self._forwarder.probe(instance, instance.base_path + check["path"],
                                           check["timeout"])
            ok = 200 <= status < 400
            detail["status"] = status
        except GatewayError as exc:
            ok = False
            detail["error"] = exc.kind or exc.error
        self._tracker.probed(health, ok, detail, check, time.time())
