"""The active health checks: one thread per process keeps the health copies in sync with the
board and probes the instances of services with a ``health_check`` whose probe it claims (one
worker or node probes an instance per interval). What a probe finds goes to the tracker
(:mod:`~gateway_app.health`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .errors import GatewayError
from .health import SYNC_INTERVAL, HealthTracker, InstanceHealth, failure_cause
from .timestamps import rfc3339

if TYPE_CHECKING:
    from .forwarding import Forwarder

#: Probes in flight at once, per process.
PROBE_CONCURRENCY = 4


class ActiveChecker:
    """One thread per process: keeps the health copies in sync with the board, and probes the
    instances of services with a ``health_check`` whose probe it claims."""

    def __init__(self, snapshot: Callable[[], Any], tracker: HealthTracker,
                 forwarder: Forwarder, tick: float = SYNC_INTERVAL) -> None:
        #: Returns the registry's current snapshot (services with their instances).
        self._snapshot = snapshot
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
            now = time.time()
            self._tracker.sync(now)
            for service in self._snapshot().services.values():
                check = service.health_check
                if check is None:
                    continue
                for instance in service.instances:
                    health = instance.health
                    if health.probing or health.next_probe > now or self._stop.is_set():
                        continue
                    if not self._tracker.claim(health, now, check["interval"]):
                        health.next_probe = now + check["interval"] / 2  # another one probes
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
            detail["error"] = failure_cause(exc)
        self._tracker.probed(health, ok, detail, check, time.time())
