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

import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import StoreUnavailable
from .health import HealthTracker
from .snapshot import EMPTY, REVOKED_PREFIX, Instance, Service, Snapshot
from .stores import InstanceRecord, Store, StoreError
from .throttle import Throttled
from .validation import instance_id

__all__ = ["EMPTY", "REVOKED_PREFIX", "Instance", "Registry", "Service", "Snapshot"]

log = logging.getLogger("gateway.registry")
T = TypeVar("T")


#: Seconds between two attempts to reach a store that failed, at most (the wait doubles from
#: the refresh interval up to this).
MAX_RETRY_DELAY = 1.0
#: Seconds :meth:`Registry.close` waits for the watcher to finish a store call.
CLOSE_WAIT = 2.0


class Registry:
    """Readers get :meth:`snapshot`; writers go through the methods below, one at a time."""

    def __init__(self, store: Store, refresh_interval: float = 0.1,
                 default_strategy: str = "round_robin",
                 health: HealthTracker | None = None) -> None:
        self.store = store
        self.refresh_interval = refresh_interval
        self.default_strategy = default_strategy
        #: The gateway's health tracker (the app state owns it): snapshots attach each
        #: instance's health copy, and registry writes go on the instances' timelines.
        self.health = health or HealthTracker()
        self._write_lock = threading.Lock()
        self._snapshot = EMPTY
        self._watching = False
        self._stop = threading.Event()
        self._error_log = Throttled()
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

    def store_outage(self) -> tuple[float, str] | None:
        """While the store fails the watcher: since when (Unix time) and its last error."""
        down_since = self._down_since
        return None if down_since is None else (down_since, self._last_error or "")

    def snapshot(self) -> Snapshot:
        """The current snapshot: a read of one reference, no lock, no I/O, except on the
        first call in a forked process, which starts its watcher and first catches up with
        the store (under the write lock). Until the registry is loaded it is :data:`EMPTY`,
        whose ``loaded`` is false."""
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
            if self._error_log.due():
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
        stored, new = self._write(self.store.register, record)
        self.health.record(name, stored.id, "registered" if new else "re-registered",
                           "registered" if new else "re-registered", stored.address)
        return stored, new

    def heartbeat(self, name: str, instance: str) -> InstanceRecord | None:
        return self._write(self.store.heartbeat, name, instance)

    def remove_instance(self, name: str, instance: str) -> InstanceRecord | None:
        return self._write(self.store.remove_instance, name, instance)

    def remove_service(self, name: str) -> list[InstanceRecord]:
        return self._write(self.store.remove_service, name)

    def drain(self, name: str, instance: str) -> InstanceRecord | None:
        return self._set_draining(name, instance, True)

    def undrain(self, name: str, instance: str) -> InstanceRecord | None:
        """Take a drained instance back into rotation (re-registering it does the same)."""
        return self._set_draining(name, instance, False)

    def _set_draining(self, name: str, instance: str, draining: bool) -> InstanceRecord | None:
        record = self._write(self.store.set_draining, name, instance, draining)
        if record is not None:
            self.health.record(name, instance, "drained" if draining else "undrained",
                               "drained" if draining else "back in rotation")
        return record

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
