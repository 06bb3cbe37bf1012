"""``memory://``: a store inside one process, for tests and single-worker use."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from typing import Any

from .base import InstanceRecord, Store, StoreState


class MemoryStore(Store):
    shared = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[tuple[str, str], InstanceRecord] = {}
        self._policies: dict[str, dict[str, Any]] = {}
        self._version = 0

    def version(self) -> int:
        return self._version

    def load(self) -> StoreState:
        with self._lock:
            return StoreState(
                version=self._version,
                instances=tuple(self._instances.values()),
                policies=copy.deepcopy(self._policies),
                now=time.time(),
            )

    def _bump(self) -> None:
        self._version += 1

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
            self._bump()
            return stored, old is None

    def heartbeat(self, service: str, instance_id: str) -> InstanceRecord | None:
        with self._lock:
            old = self._instances.get((service, instance_id))
            if old is None or old.ttl is None:
                return old
            new = dataclasses.replace(old, expires_at=time.time() + old.ttl)
            self._instances[(service, instance_id)] = new
            self._bump()
            return new

    def remove_instance(self, service: str, instance_id: str) -> InstanceRecord | None:
        with self._lock:
            old = self._instances.pop((service, instance_id), None)
            if old is not None:
                self._bump()
            return old

    def remove_service(self, service: str) -> list[InstanceRecord]:
        with self._lock:
            keys = [k for k in self._instances if k[0] == service]
            removed = [self._instances.pop(k) for k in keys]
            if removed:
                self._bump()
            return removed

    def set_draining(self, service: str, instance_id: str,
                     draining: bool = True) -> InstanceRecord | None:
        with self._lock:
            old = self._instances.get((service, instance_id))
            if old is None or old.draining == draining:
                return old
            new = dataclasses.replace(old, draining=draining)
            self._instances[(service, instance_id)] = new
            self._bump()
            return new

    def purge_expired(self) -> int:
        with self._lock:
            now = time.time()
            keys = [k for k, r in self._instances.items()
                    if r.expires_at is not None and r.expires_at <= now]
            for key in keys:
                del self._instances[key]
            if keys:
                self._bump()
            return len(keys)

    def put_policy(self, service: str, policy: dict[str, Any]) -> None:
        with self._lock:
            self._policies[service] = copy.deepcopy(policy)
            self._bump()

    def delete_policy(self, service: str) -> bool:
        with self._lock:
            found = self._policies.pop(service, None) is not None
            if found:
                self._bump()
            return found
