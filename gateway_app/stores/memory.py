"""``memory://``: a store inside one process, for tests and single-worker use."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from typing import Any

from .base import CHANGE_HISTORY, InstanceRecord, Store, StoreChanges, StoreState


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[tuple[str, str], InstanceRecord] = {}
        self._policies: dict[str, dict[str, Any]] = {}
        self._version = 0
        #: The version of each service's last change (the change history).
        self._changed: dict[str, int] = {}

    def version(self) -> int:
        return self._version

    def changes(self, since: int) -> StoreChanges | None:
        with self._lock:
            if not max(0, self._version - CHANGE_HISTORY) <= since <= self._version:
                return None
            names = frozenset(n for n, v in self._changed.items() if v > since)
            return StoreChanges(
                version=self._version,
                services=names,
                instances=tuple(r for k, r in self._instances.items() if k[0] in names),
                policies={n: copy.deepcopy(d) for n, d in self._policies.items() if n in names},
                now=time.time(),
            )

    def next_expiry(self) -> float | None:
        with self._lock:  # a scan: the memory store is for tests and small registries
            return min((r.expires_at for r in self._instances.values()
                        if r.expires_at is not None), default=None)

    def load(self) -> StoreState:
        with self._lock:
            return StoreState(
                version=self._version,
                instances=tuple(self._instances.values()),
                policies=copy.deepcopy(self._policies),
                now=time.time(),
            )

    def _bump(self, *services: str) -> None:
        self._version += 1
        for name in services:
            self._changed[name] = self._version
        if len(self._changed) > 2 * CHANGE_HISTORY:
            floor = self._version - CHANGE_HISTORY
            self._changed = {n: v for n, v in self._changed.items() if v > floor}

    def register(self, record: InstanceRecord) -> tuple[InstanceRecord, bool]:
        with self._lock:
            now = time.time()
            old = self._instances.get((record.service, record.id))
            stored = dataclasses.replace(
                record,
                registered_at=old.registered_at if old else now,
                expires_at=now + record.ttl if record.ttl is not None else None,
                draining=False,
            )
            self._instances[(record.service, record.id)] = stored
            self._bump(record.service)
            return stored, old is None

    def heartbeat(self, service: str, instance_id: str) -> InstanceRecord | None:
        with self._lock:
            old = self._instances.get((service, instance_id))
            if old is None or old.ttl is None:
                return old
            new = dataclasses.replace(old, expires_at=time.time() + old.ttl)
            self._instances[(service, instance_id)] = new
            self._bump(service)
            return new

    def remove_instance(self, service: str, instance_id: str) -> InstanceRecord | None:
        with self._lock:
            old = self._instances.pop((service, instance_id), None)
            if old is not None:
                self._bump(service)
            return old

    def remove_service(self, service: str) -> list[InstanceRecord]:
        with self._lock:
            keys = [k for k in self._instances if k[0] == service]
            removed = [self._instances.pop(k) for k in keys]
            if removed:
                self._bump(service)
            return removed

    def set_draining(self, service: str, instance_id: str,
                     draining: bool = True) -> InstanceRecord | None:
        with self._lock:
            old = self._instances.get((service, instance_id))
            if old is None or old.draining == draining:
                return old
            new = dataclasses.replace(old, draining=draining)
            self._instances[(service, instance_id)] = new
            self._bump(service)
            return new

    def purge_expired(self) -> int:
        with self._lock:
            now = time.time()
            keys = [k for k, r in self._instances.items()
                    if r.expires_at is not None and r.expires_at <= now]
            for key in keys:
                del self._instances[key]
            if keys:
                self._bump(*{k[0] for k in keys})
            return len(keys)

    def put_policy(self, service: str, policy: dict[str, Any]) -> None:
        with self._lock:
            self._policies[service] = copy.deepcopy(policy)
            self._bump(service)

    def delete_policy(self, service: str) -> bool:
        with self._lock:
            found = self._policies.pop(service, None) is not None
            if found:
                self._bump(service)
            return found
