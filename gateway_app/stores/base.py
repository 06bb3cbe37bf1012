"""The store interface: where the registry's truth lives.

A store keeps instance records and service policies, and a change counter (``version``) that
moves on every committed write, so a worker can tell cheaply whether its snapshot is stale.
It also notes which service each write touched, so a worker that is behind reads only what
changed (:meth:`Store.changes`), not the whole registry: a write costs the same with ten
services or ten thousand.
Stores own the clock for leases: ``expires_at`` is computed by the store when it commits, so
several processes (or, with Redis, several machines) agree on when a lease lapses.

Every method either commits fully or raises :class:`StoreError` having changed nothing.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .healthboard import HealthBoard


class StoreError(Exception):
    """The store could not complete an operation; nothing was changed."""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One registered instance as the store keeps it."""

    service: str
    id: str
    address: str
    weight: int = 1
    metadata: dict[str, str] = field(default_factory=dict)
    ttl: float | None = None
    registered_at: float = 0.0
    expires_at: float | None = None
    #: Set by a drain request: no new traffic, in-flight requests finish.
    draining: bool = False


@dataclass(frozen=True, slots=True)
class StoreState:
    """Everything a worker needs to build a snapshot, read in one consistent go."""

    version: int
    instances: tuple[InstanceRecord, ...]
    policies: dict[str, dict[str, Any]]
    #: The store's clock when the state was read (seconds since the epoch).
    now: float


@dataclass(frozen=True, slots=True)
class StoreChanges:
    """What changed after a version, read in one consistent go: the services touched (an
    instance or the policy added, changed or removed) and their whole state now."""

    version: int
    #: Names of the services touched since the version asked about.
    services: frozenset[str]
    #: Every instance of those services now (none for a service that is gone).
    instances: tuple[InstanceRecord, ...]
    #: The policy of each of those services that has one now.
    policies: dict[str, dict[str, Any]]
    #: The store's clock when the changes were read.
    now: float


#: Versions of change history a store keeps: a worker further behind loads everything.
CHANGE_HISTORY = 10_000


class Store(ABC):
    """What the registry needs from a store. Implementations must be safe across threads."""

    @abstractmethod
    def version(self) -> int:
        """The change counter; cheap, called a few times a second by each worker."""

    @abstractmethod
    def load(self) -> StoreState:
        """All instances and policies, with the version they belong to."""

    @abstractmethod
    def changes(self, since: int) -> StoreChanges | None:
        """What changed after version ``since``; ``None`` when the store cannot say (a version
        it does not know, or older than its history): the caller then loads everything."""

    @abstractmethod
    def next_expiry(self) -> float | None:
        """The earliest lease expiry of any instance (``None`` without leases); cheap."""

    @abstractmethod
    def register(self, record: InstanceRecord) -> tuple[InstanceRecord, bool]:
        """Insert or update an instance; keeps ``registered_at`` of an existing one, and
        undoes a drain (re-registering brings an instance back).

        The lease (``expires_at``) is set from ``record.ttl`` by the store's clock.
        Returns the stored record and whether it was new.
        """

    @abstractmethod
    def heartbeat(self, service: str, instance_id: str) -> InstanceRecord | None:
        """Renew an instance's lease; ``None`` when there is no such instance."""

    @abstractmethod
    def remove_instance(self, service: str, instance_id: str) -> InstanceRecord | None:
        """Remove one instance; ``None`` when it was not there."""

    @abstractmethod
    def remove_service(self, service: str) -> list[InstanceRecord]:
        """Remove all instances of a service; the removed ones (empty when none)."""

    @abstractmethod
    def set_draining(self, service: str, instance_id: str,
                     draining: bool = True) -> InstanceRecord | None:
        """Mark an instance as draining (or, with ``draining=False``, take it back into
        rotation); ``None`` when there is no such instance. Setting what is already set
        changes nothing (the version stays)."""

    @abstractmethod
    def purge_expired(self) -> int:
        """Remove instances whose lease lapsed; how many were removed."""

    @abstractmethod
    def put_policy(self, service: str, policy: dict[str, Any]) -> None:
        """Create or replace a service's policy."""

    @abstractmethod
    def delete_policy(self, service: str) -> bool:
        """Remove a service's policy; whether there was one."""

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Return after ``timeout`` seconds, or sooner when the store knows of a change (a
        store with notifications, like Redis pub/sub, returns as soon as one arrives) or when
        ``stop`` is set. The registry's watcher then compares versions."""
        stop.wait(timeout)

    def make_health_board(self) -> HealthBoard | None:
        """Where the health of instances is shared: by every process opening the same URL
        (see healthboard.py). ``None``, the default, keeps it inside the process (the health
        tracker's own ``LocalBoard``)."""
        return None

    def close(self) -> None:  # noqa: B027 (optional to override)
        """Release connections; the store may be reopened by the next call."""
