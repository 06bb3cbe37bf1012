"""The service registry: an immutable snapshot for readers, one writer at a time, a store below.

This is the seed's ``Arc<RwLock<HashMap>>`` made to work across gunicorn's processes:

* Readers (every proxied request) call :meth:`Registry.snapshot`, which returns the current
  :class:`Snapshot` reference. A snapshot is never mutated, so reading it takes no lock.
* Writers (the registry API) hold the write lock, commit to the store, then load the store's
  new state and publish a fresh snapshot before they answer.
* Revoked registration credentials travel with the policies: each is stored as a policy
  under a name no service can have (``_revoked:<id>``, see :data:`REVOKED_PREFIX`), so a
  revocation reaches every worker (and, with Redis, every node) the way a policy write does,
  through the stores as they are. Snapshots keep them apart from the policies.
* A watcher thread per worker process compares the store's change counter with its snapshot's
  every ``refresh_interval`` seconds (0.1 s by default: one cheap query) and reloads when
  another process wrote, so a change made through any worker reaches every worker well within
  a second, without a store query on the request path. It also purges lapsed leases.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .clock import rfc3339
from .errors import StoreUnavailable
from .health import HealthTracker, InstanceHealth
from .policies import DEFAULT_POLICY, Policy, compile_policy
from .stores import InstanceRecord, Store, StoreChanges, StoreError, StoreState
from .validation import instance_id

log = logging.getLogger("gateway.registry")
T = TypeVar("T")
#: Store policy names under which revoked registration credentials are kept (``_revoked:ID``
#: -> ``{"until": expiry}``). A service name cannot start with "_", so none collides.
REVOKED_PREFIX = "_revoked:"


class Instance:
    """An instance as request threads see it: the stored record, what forwarding needs, and
    this process's view of its health."""

    __slots__ = ("record", "service", "id", "address", "weight", "expires_at", "draining",
                 "scheme", "host", "port", "base_path", "origin", "health", "checked")

    def __init__(self, record: InstanceRecord, health: InstanceHealth | None = None,
                 checked: bool = False):
        self.record = record
        self.service = record.service
        self.id = record.id
        self.address = record.address
        self.weight = record.weight
        self.expires_at = record.expires_at
        self.draining = record.draining
        parts = urlsplit(record.address)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path
        #: ``scheme://host[:port]``, the pool key for forwarding.
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.health = health or InstanceHealth()
        #: The service has an active health check.
        self.checked = checked

    def live(self, now: float) -> bool:
        """Registered for traffic: lease valid and not draining."""
        return not self.draining and (self.expires_at is None or self.expires_at > now)

    def state(self, now: float) -> str:
        if self.draining:
            return "draining"
        health = self.health
        if (self.expires_at is not None and self.expires_at <= now) or \
                health.ejected_until > now or (self.checked and health.checked
                                               and not health.check_ok):
            return "unhealthy"
        if (self.checked and health.check_ok) or health.last_success:
            return "healthy"
        return "unknown"

    def to_dict(self, now: float) -> dict[str, Any]:
        r = self.record
        return {
            "id": r.id,
            "address": r.address,
            "weight": r.weight,
            "metadata": r.metadata,
            "ttl": r.ttl,
            "registered_at": rfc3339(r.registered_at),
            "expires_at": rfc3339(r.expires_at),
            "health": self.state(now),
            **self.health.to_dict(now),
        }


def smooth_schedule(weights: list[int], limit: int = 4096) -> tuple[int, ...]:
    """Indices in smooth weighted round-robin order (nginx's algorithm): weights 5,1,1 give
    a a b a c a a, not a a a a a b c. Weights are scaled down if the cycle would be long."""
    total = sum(weights)
    if total > limit:
        weights = [max(1, w * limit // total) for w in weights]
    current = [0] * len(weights)
    order = []
    for _ in range(sum(weights)):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=current.__getitem__)
        current[best] -= sum(weights)
        order.append(best)
    return tuple(order)


@dataclass(frozen=True)
class Service:
    name: str
    instances: tuple[Instance, ...]
    strategy: str = "round_robin"
    health_check: dict[str, Any] | None = None
    #: Round-robin order over ``instances`` by weight.
    schedule: tuple[int, ...] = ()
    #: Round-robin position; ``next()`` on ``itertools.count`` is atomic under the GIL.
    _counter: itertools.count = field(default_factory=itertools.count, compare=False)

    def choose(self, now: float, exclude: frozenset[str] = frozenset()) -> Instance | None:
        """An instance for the next request, ``None`` when none can take it.

        Instances whose lease lapsed, that drain, or that do not pass their active check get
        nothing. Ejected ones (passive health) are passed over too, unless that leaves fewer
        than half of the others: then (the panic threshold) all of them are used rather than
        none. ``exclude`` names instances a retry must avoid.
        """
        instances = self.instances
        checked = self.health_check is not None
        if len(instances) == 1 and not exclude:
            only = instances[0]  # alone, it is used even when ejected: the panic rule
            return only if only.live(now) and (not checked or only.health.check_ok) else None
        live = [i for i in instances if i.live(now) and (not checked or i.health.check_ok)]
        ready = [i for i in live if i.health.ejected_until <= now]
        if 2 * len(ready) < len(live):  # panic: most are ejected; spread over all of them
            ready = live
        if exclude:
            ready = [i for i in ready if i.id not in exclude]
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0]
        if self.strategy == "least_in_flight":
            return min(ready, key=lambda i: ((i.health.in_flight + 1) / i.weight,
                                             random.random()))
        if self.strategy == "random":
            return random.choices(ready, weights=[i.weight for i in ready])[0]
        position = next(self._counter)
        if len(ready) == len(instances):
            return instances[self.schedule[position % len(self.schedule)]]
        total = sum(i.weight for i in ready)
        point = position % total
        for instance in ready:
            point -= instance.weight
            if point < 0:
                return instance
        return ready[-1]

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "instances": [i.to_dict(now) for i in self.instances]}


@dataclass(frozen=True)
class Snapshot:
    """The registry at one version. Never mutated; replaced whole."""

    version: int
    services: Mapping[str, Service]
    #: Compiled policies for the hot path, by service name.
    policies: Mapping[str, Policy]
    #: The policies as stored, for the registry API.
    policy_docs: Mapping[str, dict[str, Any]]
    #: The earliest lease expiry, so the watcher knows when a purge is due.
    next_expiry: float | None
    #: False only for :data:`EMPTY`, the snapshot of a worker that has not loaded the
    #: registry yet: "no such service" cannot be told from it.
    loaded: bool = True

    #: Service names in order, for the paginated listing.
    names: tuple[str, ...] = ()
    #: Revoked registration credentials: id -> when its revocation may be forgotten.
    revoked: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: StoreState, health: HealthTracker | None = None,
                   default_strategy: str = "round_robin") -> Snapshot:
        """The whole registry, from a full load."""
        health = health or HealthTracker()
        docs = {name: doc for name, doc in state.policies.items()
                if not name.startswith(REVOKED_PREFIX)}
        revoked = {name[len(REVOKED_PREFIX):]: float(doc.get("until", 0))
                   for name, doc in state.policies.items() if name.startswith(REVOKED_PREFIX)}
        policies = {name: compile_policy(doc) for name, doc in docs.items()}
        grouped: dict[str, list[InstanceRecord]] = {}
        for record in state.instances:
            grouped.setdefault(record.service, []).append(record)
        services = {name: _service(name, records, policies.get(name, DEFAULT_POLICY), health,
                                   default_strategy)
                    for name, records in grouped.items()}
        health.keep_only({(r.service, r.id) for r in state.instances})
        expiries = [r.expires_at for r in state.instances if r.expires_at is not None]
        return cls(
            version=state.version,
            services=services,
            policies=policies,
            policy_docs=docs,
            next_expiry=min(expiries) if expiries else None,
            names=tuple(sorted(services)),
            revoked=revoked,
        )

    def apply(self, changes: StoreChanges, health: HealthTracker,
              default_strategy: str = "round_robin") -> Snapshot:
        """A new snapshot: this one with the services ``changes`` touched rebuilt, the others
        shared as they are (their objects, their round-robin positions). Costs what changed,
        plus copying the maps of references (C speed: about 0.1 ms for 10,000 services)."""
        services = dict(self.services)
        policies = dict(self.policies)
        policy_docs = dict(self.policy_docs)
        grouped: dict[str, list[InstanceRecord]] = {}
        for record in changes.instances:
            grouped.setdefault(record.service, []).append(record)
        added, removed = [], []
        revoked: dict[str, float] | None = None  # copied at the first revocation changed
        for name in changes.services:
            doc = changes.policies.get(name)
            if name.startswith(REVOKED_PREFIX):  # a revoked credential, not a service
                revoked = dict(self.revoked) if revoked is None else revoked
                if doc is None:
                    revoked.pop(name[len(REVOKED_PREFIX):], None)
                else:
                    revoked[name[len(REVOKED_PREFIX):]] = float(doc.get("until", 0))
                continue
            if doc is None:
                policies.pop(name, None)
                policy_docs.pop(name, None)
            else:
                policies[name] = compile_policy(doc)
                policy_docs[name] = doc
            old = services.get(name)
            records = grouped.get(name)
            if records:
                services[name] = _service(name, records, policies.get(name, DEFAULT_POLICY),
                                          health, default_strategy)
                if old is None:
                    added.append(name)
            elif old is not None:
                del services[name]
                removed.append(name)
            if old is not None:  # forget the health of instances that left
                kept = {r.id for r in records or ()}
                health.forget(name, [i.id for i in old.instances if i.id not in kept])
        names = self.names
        if added or removed:
            ordered = list(names)
            for name in removed:
                del ordered[bisect.bisect_left(ordered, name)]
            for name in added:
                bisect.insort(ordered, name)
            names = tuple(ordered)
        # A bound, never later than the earliest lease: a lease renewed or removed leaves it
        # early, and the watcher then asks the store for the true one (Registry.refresh).
        expiries = [r.expires_at for r in changes.instances if r.expires_at is not None]
        if self.next_expiry is not None:
            expiries.append(self.next_expiry)
        return Snapshot(
            version=changes.version,
            services=services,
            policies=policies,
            policy_docs=policy_docs,
            next_expiry=min(expiries) if expiries else None,
            names=names,
            revoked=self.revoked if revoked is None else revoked,
        )


def _service(name: str, records: list[InstanceRecord], policy: Policy, health: HealthTracker,
             default_strategy: str) -> Service:
    check = policy.health_check
    ordered = sorted(records, key=lambda r: (r.registered_at, r.id))
    instances = tuple(Instance(r, health.get(name, r.id), check is not None) for r in ordered)
    return Service(name, instances, strategy=policy.balancing or default_strategy,
                   health_check=check, schedule=smooth_schedule([i.weight for i in instances]))


EMPTY = Snapshot(version=-1, services={}, policies={}, policy_docs={}, next_expiry=None,
                 loaded=False)

#: Seconds between two attempts to reach a store that failed, at most (the wait doubles from
#: the refresh interval up to this).
MAX_RETRY_DELAY = 1.0
#: Seconds :meth:`Registry.close` waits for the watcher to finish a store call.
CLOSE_WAIT = 2.0


class Registry:
    """Readers get :meth:`snapshot`; writers go through the methods below, one at a time."""

    def __init__(self, store: Store, refresh_interval: float = 0.1,
                 default_strategy: str = "round_robin", ejection_seconds: float = 30.0) -> None:
        self.store = store
        self.refresh_interval = refresh_interval
        self.default_strategy = default_strategy
        #: This process's view of every instance's health, kept across snapshots.
        self.health = HealthTracker(ejection_seconds)
        self._write_lock = threading.Lock()
        self._snapshot = EMPTY
        self._watching = False
        self._stop = threading.Event()
        self._last_error_log = 0.0
        #: The store's clock minus ours, from the last load (leases run on the store's clock).
        self._clock_offset = 0.0
        #: When the store stopped answering (``None`` while it answers): leases do not lapse
        #: during an outage, since their heartbeats cannot get through either.
        self._down_since: float | None = None
        #: Why the store last failed, for the readiness answer.
        self._last_error = ""
        #: Store failures in a row: the watcher backs off while they last.
        self._failures = 0
        self._thread: threading.Thread | None = None
        # A forked child must start its own watcher: threads do not survive fork.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_watcher(ref))
        try:
            self.reload()
        except StoreUnavailable as exc:
            # Start, but not ready: proxied requests get 503 (not 404) until the watcher,
            # retrying with backoff, has loaded the registry.
            self._down_since = time.time()
            self._last_error = exc.description or ""
            log.warning("the registry could not be loaded; not ready until it is (retrying): "
                        "%s", exc.description)
        self._start_watcher()

    # -- readers ---------------------------------------------------------------------------

    def now(self) -> float:
        """The time leases are judged by: the store's clock, frozen while the store is down."""
        down_since = self._down_since
        return (time.time() if down_since is None else down_since) + self._clock_offset

    def not_ready_reason(self) -> str | None:
        """Why this worker cannot route yet (``None`` once the registry is loaded)."""
        if self._snapshot.loaded:
            return None
        reason = "the registry has not been loaded from its store yet"
        return f"{reason} ({self._last_error})" if self._last_error else reason

    def store_answers(self) -> bool:
        """The store answered the watcher's last call (for the ``gateway_store_up`` metric)."""
        return self._down_since is None and self._snapshot.loaded

    def snapshot(self) -> Snapshot:
        """The current snapshot. No lock, no I/O. Until the registry is loaded it is
        :data:`EMPTY`, whose ``loaded`` is false."""
        if not self._watching:
            self._start_watcher()
        return self._snapshot

    def current(self) -> Snapshot:
        """The snapshot, first brought up to date with the store (one cheap query).

        For the registry API's reads: an operator who just wrote through one worker reads
        their write back through any other. Proxied requests use :meth:`snapshot`.
        """
        if self._call(self.store.version) != self._snapshot.version:
            return self.catch_up()
        return self.snapshot()

    # -- keeping the snapshot fresh --------------------------------------------------------

    def reload(self) -> Snapshot:
        """Load the store's whole state and publish it as the current snapshot."""
        with self._write_lock:
            return self._reload_locked()

    def catch_up(self) -> Snapshot:
        """Bring the snapshot up to the store's version, reading only what changed."""
        with self._write_lock:
            return self._catch_up_locked()

    def _catch_up_locked(self) -> Snapshot:
        snap = self._snapshot
        if not snap.loaded:
            return self._reload_locked()
        changes = self._call(self.store.changes, snap.version)
        if changes is None:  # too far behind, or the store lost its data: load it all
            return self._reload_locked()
        self._clock_offset = changes.now - time.time()
        if changes.version != snap.version:
            self._snapshot = snap.apply(changes, self.health, self.default_strategy)
        return self._snapshot

    def _reload_locked(self) -> Snapshot:
        state = self._call(self.store.load)
        self._clock_offset = state.now - time.time()
        if state.version != self._snapshot.version:
            self._snapshot = Snapshot.from_state(state, self.health, self.default_strategy)
        return self._snapshot

    def _start_watcher(self) -> None:
        with self._write_lock:
            if self._watching:
                return
            self._watching = True
            self._stop.clear()
            try:  # a forked child's snapshot may be old: catch up before serving from it
                self._reload_locked()
            except StoreUnavailable:
                pass  # the watcher retries
            thread = threading.Thread(target=self._watch, name="registry-watcher", daemon=True)
            thread.start()
            self._thread = thread

    def _watch(self) -> None:
        while not self._stop.is_set():
            delay = self.refresh_interval
            if self._failures:  # back off from a store that fails, up to MAX_RETRY_DELAY
                delay = min(MAX_RETRY_DELAY, delay * 2 ** min(self._failures, 16))
            self.store.wait_for_change(delay, self._stop)
            if self._stop.is_set():
                return
            self.watch_step()

    def watch_step(self) -> None:
        """Refresh, noting when the store stops and starts answering."""
        try:
            self.refresh()
        except StoreUnavailable as exc:
            self._failures += 1
            self._last_error = exc.description or ""
            if self._down_since is None:
                self._down_since = time.time()
            now = time.monotonic()
            if now - self._last_error_log > 30:
                self._last_error_log = now
                if self._snapshot.loaded:
                    log.warning("registry refresh failed, serving the last snapshot: %s",
                                exc.description)
                else:
                    log.warning("the registry still cannot be loaded; not ready: %s",
                                exc.description)
            return
        self._failures = 0
        if self._down_since is not None:
            self._down_since = None
            log.warning("the registry store answers again")

    def refresh(self) -> None:
        """One watcher step: reload if another process wrote; purge lapsed leases when due."""
        snap = self._snapshot
        if not snap.loaded:
            self.reload()
        elif self._call(self.store.version) != snap.version:
            self.catch_up()
        elif snap.next_expiry is not None and self.now() >= snap.next_expiry:
            with self._write_lock:
                self._call(self.store.purge_expired)
                self._catch_up_locked()
                # the earliest lease now (the snapshot's was a bound: renewals move it on)
                self._snapshot = dataclasses.replace(
                    self._snapshot, next_expiry=self._call(self.store.next_expiry))

    def close(self) -> None:
        """Stop the watcher (waiting a little for a store call it is in) and release the
        store: closing the store under a call in flight made the watcher die with a trace."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_WAIT)
        self._watching = False
        self.store.close()

    # -- writers ---------------------------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except StoreError as exc:
            raise StoreUnavailable(f"the registry store is unavailable: {exc}") from exc

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Commit through the store, then catch the snapshot up before answering (reading
        what changed since it, this write and any other process's). Only the commit can
        fail the write: once the store took it, it is acknowledged."""
        with self._write_lock:
            result = self._call(fn, *args)
            try:
                self._catch_up_locked()
            except StoreUnavailable as exc:
                # Committed: the answer must say so. The watcher catches up when it can.
                log.warning("a write was committed but could not be read back yet: %s",
                            exc.description)
            return result

    def register(self, name: str, address: str, ttl: float | None = None, weight: int = 1,
                 metadata: dict[str, str] | None = None) -> tuple[InstanceRecord, bool]:
        """Add an instance, or renew and update it. ``address`` must be normalised."""
        record = InstanceRecord(service=name, id=instance_id(address), address=address,
                                weight=weight, metadata=metadata or {}, ttl=ttl)
        return self._write(self.store.register, record)

    def heartbeat(self, name: str, instance: str) -> InstanceRecord | None:
        return self._write(self.store.heartbeat, name, instance)

    def remove_instance(self, name: str, instance: str) -> InstanceRecord | None:
        return self._write(self.store.remove_instance, name, instance)

    def remove_service(self, name: str) -> list[InstanceRecord]:
        return self._write(self.store.remove_service, name)

    def drain(self, name: str, instance: str) -> InstanceRecord | None:
        return self._write(self.store.set_draining, name, instance, True)

    def undrain(self, name: str, instance: str) -> InstanceRecord | None:
        """Take a drained instance back into rotation (re-registering it does the same)."""
        return self._write(self.store.set_draining, name, instance, False)

    def put_policy(self, name: str, policy: dict[str, Any]) -> None:
        self._write(self.store.put_policy, name, policy)

    def delete_policy(self, name: str) -> bool:
        return self._write(self.store.delete_policy, name)

    def revoke(self, credential_id: str, until: float, limit: int) -> None:
        """Keep a registration credential's id as revoked until ``until`` (its latest possible
        expiry), forgetting revocations whose time has passed. :class:`ValueError` when
        ``limit`` revocations are already kept."""
        with self._write_lock:
            snapshot = self._reload_locked()
            now = time.time()
            for old, old_until in snapshot.revoked.items():
                if old_until < now:
                    self._call(self.store.delete_policy, REVOKED_PREFIX + old)
            live = sum(1 for u in snapshot.revoked.values() if u >= now)
            if credential_id not in snapshot.revoked and live >= limit:
                raise ValueError(f"{live} credentials are revoked already")
            self._call(self.store.put_policy, REVOKED_PREFIX + credential_id,
                       {"until": until})
            self._reload_locked()


def _forget_watcher(ref: weakref.ref[Registry]) -> None:
    registry = ref()
    if registry is not None:
        registry._watching = False
        registry._thread = None
        registry._write_lock = threading.Lock()
        registry._stop = threading.Event()
