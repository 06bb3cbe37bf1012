"""Instance health, one view per gateway: passive outlier ejection, active checks, timelines.

Passive (Envoy's outlier detection): an instance that fails :data:`EJECT_AFTER` times in a row
(connect error, timeout, 502/503/504), counted over every worker, is ejected for 30 s, doubling
with each ejection in a row up to 300 s, then tried again; a success resets it.

Active (Kong's and Caddy's health checks): when a service's policy has a ``health_check``, its
instances are probed through the forwarder that carries the traffic (the same pools, TLS
settings and address checks). Each probe is claimed on the board, so one worker probes an
instance per interval, not every worker. An instance of such a service takes traffic only after
its first pass, and unhealthy instances keep being probed, so they always recover.

The truth is a :class:`~gateway_app.stores.healthboard.HealthBoard` shared by the workers (and,
with Redis, the nodes): each transition (a failure counted, an ejection, a recovery, a probe
result) is one atomic update there, with an event appended to the instance's timeline. Request
threads read this process's copy of each instance's state (:class:`InstanceHealth`) without a
lock and without I/O; one thread per process (:class:`~gateway_app.prober.ActiveChecker`)
brings the copies up to date every :data:`SYNC_INTERVAL` seconds and reports this worker's
requests in flight. Every event goes through :meth:`HealthTracker.emit`, the one place to hook
(metrics, logs).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import GatewayError
from .stores import StoreError
from .stores.healthboard import HealthBoard, LocalBoard
from .timestamps import rfc3339

if TYPE_CHECKING:
    pass

log = logging.getLogger("gateway.health")

#: Consecutive failures that eject an instance.
EJECT_AFTER = 5
#: First ejection, and the cap on the doubling (as multiples of it: 30 s up to 300 s).
BASE_EJECTION = 30.0
MAX_EJECTION_FACTOR = 10
#: Upstream statuses that count as failures of the instance.
FAILURE_STATUSES = frozenset({502, 503, 504})
#: Seconds between two looks at the board (and probe rounds): the propagation bound of the
#: shared view is a few of these.
SYNC_INTERVAL = 0.2
#: Seconds between two reports of a worker's in-flight counts when they do not change.
REPORT_EVERY = 1.0
#: Seconds request threads leave a board alone after it failed (the health thread does not).
BOARD_RETRY = 5.0
#: Readable words for the forwarder's failure kinds.
_KIND_WORDS = {"connect_refused": "connection refused", "connect_timeout": "connect timeout",
               "name_unresolved": "name does not resolve", "reset": "connection reset"}


def failure_cause(exc: GatewayError) -> str:
    """What an upstream failure was, in a few words, for the timeline."""
    return _KIND_WORDS.get(exc.kind, exc.kind.replace("_", " ")) or exc.error


class InstanceHealth:
    """This process's copy of one instance's shared health, read by request threads without a
    lock. The tracker writes it: the shared fields from the board's state (:meth:`apply`),
    ``in_flight`` under its lock, the probe bookkeeping from the checker thread."""

    __slots__ = ("key", "consecutive_failures", "ejected_until", "ejections", "in_flight",
                 "probed", "check_ok", "last_check", "served", "last_cause",
                 "next_probe", "probing")

    def __init__(self, key: str = "") -> None:
        #: ``SERVICE/ID``, the instance's key on the board.
        self.key = key
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        #: This worker's requests in flight to the instance (the listing sums every worker's).
        self.in_flight = 0
        #: Active checks: has a probe ever finished, and is the instance passing?
        self.probed = False
        self.check_ok = False
        self.last_check: dict[str, Any] | None = None
        #: Has any worker ever had an answer from it (healthy rather than unknown)?
        self.served = False
        self.last_cause: str | None = None
        #: Probe bookkeeping of this process: when to look again, and a probe running.
        self.next_probe = 0.0
        self.probing = False

    def apply(self, state: Mapping[str, Any]) -> None:
        """Take the board's state for this instance."""
        self.consecutive_failures = int(state.get("failures", 0))
        self.ejections = int(state.get("ejections", 0))
        self.ejected_until = float(state.get("ejected_until", 0.0))
        self.probed = bool(state.get("probed", False))
        self.check_ok = bool(state.get("check_ok", False))
        self.last_check = state.get("last_check")
        self.served = bool(state.get("served", False))
        self.last_cause = state.get("cause")

    def state(self) -> dict[str, Any]:
        """This copy as a board state (when the board cannot be read)."""
        return {"failures": self.consecutive_failures, "ejections": self.ejections,
                "ejected_until": self.ejected_until, "probed": self.probed,
                "check_ok": self.check_ok, "last_check": self.last_check,
                "served": self.served, "cause": self.last_cause, "in_flight": self.in_flight}


def describe(state: Mapping[str, Any], now: float, has_check: bool) -> dict[str, Any]:
    """An instance's health fields in the registry listing, from its shared state.

    ``state`` is ``"ejected"`` while a passive ejection lasts or, for a service with an active
    check, until the instance passes it; ``"healthy"`` otherwise (the listing says
    ``"draining"`` instead for a drained instance)."""
    ejected_until = float(state.get("ejected_until", 0.0))
    failing = has_check and not state.get("check_ok", False)
    return {
        "state": "ejected" if ejected_until > now or failing else "healthy",
        "consecutive_failures": int(state.get("failures", 0)),
        "ejected_until": rfc3339(ejected_until) if ejected_until > now else None,
        "in_flight": int(state.get("in_flight", 0)),
        "last_check": state.get("last_check"),
        "last_cause": state.get("cause"),
    }


class HealthTracker:
    """The health of every instance: transitions on the board, copies for request threads."""

    def __init__(self, board: HealthBoard | None = None,
                 ejection_seconds: float = BASE_EJECTION, node: str = "local") -> None:
        self.board = board or LocalBoard()
        self.ejection_seconds = ejection_seconds
        self.node = node
        #: Called with ``(service, instance_id, event)`` for every event (see :meth:`emit`).
        self.listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._entries: dict[str, InstanceHealth] = {}
        #: The last state read from the board for each key (for copies made after it).
        self._known: dict[str, dict[str, Any]] = {}
        self._seen_version = -1
        self._reported: dict[str, int] | None = None
        self._reported_at = 0.0
        self._last_warning = 0.0
        #: Until when (monotonic) request threads do not try the board, after it failed.
        self._board_down_until = 0.0

    # -- this process's copies ---------------------------------------------------------------

    def get(self, service: str, instance_id: str) -> InstanceHealth:
        key = f"{service}/{instance_id}"
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = InstanceHealth(key)
                    known = self._known.get(key)
                    if known is not None:
                        entry.apply(known)
        return entry

    def forget(self, service: str, instance_ids: Iterable[str], before: float) -> None:
        """Forget instances of ``service`` that left the registry, here and on the board
        (their timelines go with them)."""
        keys = [f"{service}/{i}" for i in instance_ids]
        if keys:
            with self._lock:
                for key in keys:
                    self._entries.pop(key, None)
                    self._known.pop(key, None)
            self._quietly(self.board.forget, keys, before)

    def keep_only(self, keys: set[tuple[str, str]], before: float) -> None:
        """Forget every instance but ``keys`` (a full load of the registry)."""
        wanted = {f"{s}/{i}" for s, i in keys}
        with self._lock:
            for key in [k for k in self._entries if k not in wanted]:
                del self._entries[key]
            for key in [k for k in self._known if k not in wanted]:
                del self._known[key]
        board_keys = self._quietly(self.board.keys)
        if board_keys:
            self._quietly(self.board.forget, board_keys - wanted, before)

    # -- around each request (the hot path: no I/O unless something changes) ------------------

    def started(self, health: InstanceHealth) -> None:
        with self._lock:
            health.in_flight += 1

    def finished(self, health: InstanceHealth) -> None:
        with self._lock:
            health.in_flight -= 1

    def succeeded(self, health: InstanceHealth, now: float) -> None:
        if not (health.consecutive_failures or health.ejections or not health.served):
            return  # the usual case: nothing to change

        def change(state: dict[str, Any]) -> tuple[Any, Any, None]:
            if not (state.get("failures") or state.get("ejections")) and state.get("served"):
                return None, None, None
            event = None
            if state.get("ejections"):
                event = self._event("recovered", "request succeeded after ejection", now)
            return {**state, "failures": 0, "ejections": 0, "served": True,
                    "updated": now}, event, None
        self._transition(health, change)

    def failed(self, health: InstanceHealth, now: float, cause: str) -> bool:
        """A request to the instance failed (``cause``: what happened, in a few words);
        ``True`` when this failure ejected it."""
        if health.ejected_until > now:
            return False  # ejected already (panic routing): nothing more to count
        base = self.ejection_seconds

        def change(state: dict[str, Any]) -> tuple[Any, Any, float | None]:
            if float(state.get("ejected_until", 0.0)) > now:
                return None, None, None
            failures = int(state.get("failures", 0)) + 1
            if failures < EJECT_AFTER:
                return {**state, "failures": failures, "updated": now}, None, None
            ejections = int(state.get("ejections", 0))
            seconds = min(base * MAX_EJECTION_FACTOR, base * 2 ** ejections)
            text = f"{failures} consecutive failures: {cause}"
            return ({**state, "failures": 0, "ejections": ejections + 1,
                     "ejected_until": now + seconds, "cause": text, "updated": now},
                    self._event("ejected", text, now, seconds), seconds)
        seconds = self._transition(health, change)
        if seconds is not None:
            log.warning("instance %s ejected for %.0f s after %d failures in a row (%s)",
                        health.key, seconds, EJECT_AFTER, cause)
        return seconds is not None

    def probed(self, health: InstanceHealth, ok: bool, detail: dict[str, Any],
               check: Mapping[str, Any], now: float) -> None:
        """A probe's result; ``detail`` has its time and status or error."""
        health.probing = False
        health.next_probe = now + check["interval"]
        last_check = {"ok": ok, **detail}

        def change(state: dict[str, Any]) -> tuple[Any, Any, None]:
            new = {**state, "last_check": last_check, "probed": True, "updated": now}
            first = not state.get("probed")
            was_ok = bool(state.get("check_ok"))
            event = None
            if ok:
                new["passes"], new["fails"] = int(state.get("passes", 0)) + 1, 0
                if was_ok:
                    pass
                elif first or new["passes"] >= check["healthy_threshold"]:
                    new["check_ok"] = True
                    event = self._event("probe_passed", "probe passed", now, detail.get("status"))
                if float(state.get("ejected_until", 0.0)) > now:  # lifts an ejection (Envoy)
                    new.update(ejected_until=0.0, failures=0)
                    event = event or self._event("recovered", "probe passed during ejection",
                                                 now, detail.get("status"))
            else:
                new["fails"], new["passes"] = int(state.get("fails", 0)) + 1, 0
                if first or (was_ok and new["fails"] >= check["unhealthy_threshold"]):
                    new["check_ok"] = False
                    what = (f"HTTP {detail['status']}" if "status" in detail
                            else detail.get("error", "failed"))
                    event = self._event("probe_failed", f"probe: {what}", now,
                                        detail.get("status"))
            if event is not None:
                new["cause"] = event["cause"]
            return new, event, None
        self._transition(health, change)

    def claim(self, health: InstanceHealth, now: float, seconds: float) -> bool:
        """May this worker probe the instance now (nobody else does)?"""
        claimed = self._quietly(self.board.claim, health.key, now, seconds)
        return True if claimed is None else bool(claimed)

    # -- events ------------------------------------------------------------------------------

    def _event(self, kind: str, cause: str, now: float, value: Any = None) -> dict[str, Any]:
        return {"time": round(now, 6), "node": self.node, "worker": os.getpid(),
                "cause": cause, "value": value, "kind": kind}

    def record(self, service: str, instance_id: str, kind: str, cause: str,
               value: Any = None) -> None:
        """An event without a change of health (a registration, a drain), on the timeline."""
        now = time.time()
        event = self._event(kind, cause, now, value)
        self._transition(self.get(service, instance_id),
                         lambda state: ({**state, "cause": cause, "updated": now}, event, None))

    def emit(self, health: InstanceHealth, event: dict[str, Any]) -> None:
        """Every event of every instance passes here once, after it is recorded: the place
        for metrics and logs to hook (``listeners``)."""
        service, _, instance_id = health.key.partition("/")
        log.info("instance %s: %s", health.key, event["cause"])
        for listener in self.listeners:
            try:
                listener(service, instance_id, event)
            except Exception:  # noqa: BLE001 (a hook must not break a request)
                log.exception("health listener failed")

    def events(self, service: str, instance_id: str) -> list[dict[str, Any]]:
        """The instance's timeline, oldest first. Raises StoreError."""
        return self.board.events(f"{service}/{instance_id}")

    def _transition(self, health: InstanceHealth, change: Callable[..., Any]) -> Any:
        """Apply ``change`` on the board, then to this copy; with the board out of reach,
        to this copy alone (the traffic goes on; the other workers learn nothing)."""
        emitted: list[dict[str, Any]] = []

        def tracked(state: dict[str, Any]) -> Any:
            emitted.clear()
            new, event, result = change(state)
            if event is not None:
                emitted.append(event)
            return new, event, result
        state = None
        if time.monotonic() >= self._board_down_until:
            try:
                result, state = self.board.update(health.key, tracked)
            except StoreError as exc:
                # Request threads leave the board alone for a while (the health thread
                # tries it meanwhile): an outage must not cost every failure a timeout.
                self._board_down_until = time.monotonic() + BOARD_RETRY
                self._warn(exc)
        if state is None:
            state, _, result = tracked(health.state())
        if state is not None:
            with self._lock:
                self._known[health.key] = state
            health.apply(state)
        for event in emitted:
            self.emit(health, event)
        return result

    # -- the shared view ---------------------------------------------------------------------

    def sync(self, now: float) -> None:
        """Bring this process's copies up to date with the board, and report this worker's
        requests in flight when they changed (or every :data:`REPORT_EVERY` seconds)."""
        board = self.board
        try:
            version = board.version()
            self._board_down_until = 0.0
            if version != self._seen_version:
                version, states = board.changed(self._seen_version)
                with self._lock:
                    self._known.update(states)
                    for key, state in states.items():
                        entry = self._entries.get(key)
                        if entry is not None:
                            entry.apply(state)
                self._seen_version = version
            counts = {k: e.in_flight for k, e in list(self._entries.items()) if e.in_flight}
            if counts != self._reported or now - self._reported_at >= REPORT_EVERY:
                board.report(f"{self.node}/{os.getpid()}", counts, now)
                self._reported, self._reported_at = counts, now
        except StoreError as exc:
            self._warn(exc)

    def view(self, keys: list[str], now: float) -> dict[str, dict[str, Any]]:
        """The shared state of ``keys`` with their requests in flight over every worker, for
        the listing: the same whichever worker answers. From this process's copies when the
        board cannot be read."""
        try:
            # This worker's own count as it is now, not as last reported: with one worker
            # the listing is exact, with several it lags only for the others.
            counts = {k: e.in_flight for k, e in list(self._entries.items()) if e.in_flight}
            self.board.report(f"{self.node}/{os.getpid()}", counts, now)
            self._reported, self._reported_at = counts, now
            states = self.board.states(keys)
            in_flight = self.board.in_flight(now)
        except StoreError as exc:
            self._warn(exc)
            return {k: e.state() for k in keys if (e := self._entries.get(k)) is not None}
        return {k: {**states.get(k, {}), "in_flight": in_flight.get(k, 0)} for k in keys}

    def _quietly(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or ``None`` when the board fails or failed lately (see
        :data:`BOARD_RETRY`). A state it leaves behind (a forget undone) is cleared at the next
        full load of the registry (a worker's start)."""
        if time.monotonic() < self._board_down_until:
            return None
        try:
            return fn(*args)
        except StoreError as exc:
            self._board_down_until = time.monotonic() + BOARD_RETRY
            self._warn(exc)
            return None

    def _warn(self, exc: StoreError) -> None:
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            log.warning("the health board cannot be reached; health stays per worker: %s", exc)

    def close(self) -> None:
        """Say this worker has nothing in flight any more, and release the board."""
        if self._reported:
            self._quietly(self.board.report, f"{self.node}/{os.getpid()}", {}, time.time())
        self.board.close()
