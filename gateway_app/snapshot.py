"""What readers of the registry see: immutable snapshots of services and their instances.

A :class:`Snapshot` is the registry at one store version; it is never mutated, only replaced
whole (see registry.py), so request threads read it without a lock. Each :class:`Instance`
carries this process's copy of its health (see health.py), kept across snapshots by the
health tracker.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import balancing
from .balancing import smooth_schedule
from .health import HealthTracker, InstanceHealth, describe
from .policies import DEFAULT_POLICY, Policy, compile_policy
from .stores import InstanceRecord, StoreChanges, StoreState
from .timestamps import rfc3339

#: Store policy names under which revoked registration credentials are kept (``_revoked:ID``
#: -> ``{"until": expiry}``). A service name cannot start with "_", so none collides.
REVOKED_PREFIX = "_revoked:"


class Instance:
    """An instance as request threads see it: the stored record, what forwarding needs, and
    this process's copy of its health."""

    __slots__ = ("record", "service", "id", "address", "weight", "expires_at", "draining",
                 "scheme", "host", "port", "base_path", "origin", "health", "has_check")

    def __init__(self, record: InstanceRecord, health: InstanceHealth | None = None,
                 has_check: bool = False):
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
        self.health = health or InstanceHealth(f"{record.service}/{record.id}")
        #: Its service has an active health check (the instance must pass it for traffic).
        self.has_check = has_check

    def live(self, now: float) -> bool:
        """Registered for traffic: lease valid and not draining."""
        return not self.draining and (self.expires_at is None or self.expires_at > now)

    def to_dict(self, now: float, health: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The instance in the listing, with ``health``, its shared health state (this
        process's copy when not given)."""
        r = self.record
        state = self.health.state() if health is None else health
        fields = describe(state, now, self.has_check)
        if self.draining:
            fields["state"] = verdict = "draining"
        elif (self.expires_at is not None and self.expires_at <= now) \
                or float(state.get("ejected_until", 0.0)) > now \
                or (self.has_check and state.get("probed") and not state.get("check_ok")):
            verdict = "unhealthy"
        elif (self.has_check and state.get("check_ok")) or state.get("served"):
            verdict = "healthy"
        else:
            verdict = "unknown"
        return {
            "id": r.id,
            "address": r.address,
            "weight": r.weight,
            "metadata": r.metadata,
            "ttl": r.ttl,
            "registered_at": rfc3339(r.registered_at),
            "expires_at": rfc3339(r.expires_at),
            "health": verdict,
            **fields,
        }


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
        """An instance for the next request (see :func:`gateway_app.balancing.choose`)."""
        return balancing.choose(self, now, exclude)

    def to_dict(self, now: float,
                health: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """The service in the listing; ``health``: the shared health by instance key (see
        :meth:`HealthTracker.view`), else this process's copies."""
        return {"name": self.name, "instances": [
            i.to_dict(now, None if health is None else health.get(i.health.key, {}))
            for i in self.instances]}


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
        health.keep_only({(r.service, r.id) for r in state.instances}, before=state.now)
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
                health.forget(name, [i.id for i in old.instances if i.id not in kept],
                              before=changes.now)
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
