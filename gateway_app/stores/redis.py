"""``redis://``: one registry for many gateway processes on many machines.

URLs (``GATEWAY_STORE``)::

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]
    rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]             (TLS)
    redis+sentinel://[[USER]:PASSWORD@]HOST1:PORT1[,HOST2:PORT2...]/SERVICE_NAME[/DB][?OPTIONS]

``DB`` defaults to 0 and a Sentinel's port to 26379. ``PASSWORD`` is the data server's;
Sentinels that want one of their own take ``sentinel_password=``. Options of the gateway's own:

* ``prefix`` (default ``gateway:``): every key and the notification channel start with it, so
  several gateway clusters (or test runs) can share one Redis.
* ``socket_timeout``, ``socket_connect_timeout`` (seconds, default 1): bounds on every registry
  call, so a write during an outage fails (503) instead of hanging.
* ``rate_limit_timeout`` (seconds, default 0.25): the same bound for the per-request
  rate-limit check.

Any other option is redis-py's (``ssl_ca_certs=/path/ca.pem``, ``ssl_cert_reqs=none``,
``client_name=...``); redis-py's own retries are turned off so that the bounds above hold.

Layout, under the prefix::

    version                 string   the change counter (INCR on every change)
    index                   set      "SERVICE/ID" of every instance
    service:SERVICE         set      the ids of the service's instances
    instance:SERVICE/ID     hash     address, weight, metadata (JSON), ttl (seconds or ""),
                                     registered_at, expires_at (microseconds or ""), draining
    leases                  zset     "SERVICE/ID" scored by expires_at, for purges
    policies                hash     SERVICE -> policy JSON
    changelog               zset     SERVICE scored by the version of its last change (the last
                                     CHANGE_HISTORY versions), so a worker reads what changed
    changelog_versions      zset     each of those versions, so a gap shows
    changelog_since         string   the version the change history starts from
    layout                  string   "2" once the sets and history above are kept
    ratelimit:HASH          hash     tokens, ts: one client's token bucket, PEXPIREd when full
                                     (written by gateway_app/redis_limiter.py)
    changes                 channel  the new version, published by every change

Every write is one Lua script, so it is atomic and its clock is the Redis server's ``TIME``
(leases lapse at the same moment for every node, whatever their clocks say). Each carries a
deadline on that clock, and changes nothing when it runs later (see
:class:`~gateway_app.stores.redis_client.ServerClock`): a write whose caller was answered with
an error never takes effect afterwards. A script that changes something bumps ``version`` and
publishes it on ``changes`` (:mod:`~gateway_app.stores.redis_pubsub`); one that changes
nothing leaves both alone. When ``version`` does not exist (a new or wiped Redis) the first
write sets it from the server clock in microseconds, so versions never repeat after a data
loss.

Every write costs the same whatever the registry's size, and so does a worker catching up
with it (``changes``): only a full load reads the index whole. All gateways on one prefix must
run a release with the same layout: one of the older layout (before ``changelog``) writes
without noting what changed; a newer one sees the gap in ``changelog_versions`` and loads
everything.

The scripts compute keys from the prefix, so Redis Cluster is not supported: use one
primary (with replicas and Sentinel for failover). Durability is Redis's: run it with
``appendonly yes`` (``appendfsync always`` for no loss at all on a crash) and
``maxmemory-policy noeviction``.
"""


from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..throttle import Throttled
from . import redis_scripts as scripts
from .base import InstanceRecord, Store, StoreChanges, StoreError, StoreState
from .redis_client import REDIS_ERRORS, ServerClock, make_client, parse_url
from .redis_pubsub import ChangeSubscription

if TYPE_CHECKING:
    from .healthboard import HealthBoard

log = logging.getLogger("gateway.store")

#: Services changed since a worker's version above which it loads everything instead.
MAX_INCREMENTAL_SERVICES = 1000
#: Instances read per round trip by a full load.
LOAD_BATCH = 500


def _record(member: str, flat: Sequence[str]) -> InstanceRecord:
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    service, _, id_ = member.partition("/")
    ttl, expires = fields.get("ttl", ""), fields.get("expires_at", "")
    return InstanceRecord(
        service=service, id=id_, address=fields["address"], weight=int(fields["weight"]),
        metadata=json.loads(fields["metadata"]), ttl=float(ttl) if ttl else None,
        registered_at=int(fields["registered_at"]) / 1e6,
        expires_at=int(expires) / 1e6 if expires else None,
        draining=fields.get("draining") == "1",
    )



class RedisStore(Store):
    """The registry in Redis, shared by every gateway process that opens the same URL."""

    def __init__(self, url: str) -> None:
        self.config = parse_url(url)
        self.description = f"redis store {self.config.where}"
        p = self.config.prefix
        self._version_key = p + "version"
        self._index_key = p + "index"
        self._leases_key = p + "leases"
        self._policies_key = p + "policies"
        self._instance_prefix = p + "instance:"
        self.channel = p + "changes"
        self._service_prefix = p + "service:"
        #: The keys every registry write script gets first (see ``_COMMON``).
        self._keys = [self._version_key, self._index_key, self._leases_key, self._policies_key,
                      p + "changelog", p + "changelog_since"]
        self._layout_keys = [self._version_key, self._index_key, p + "changelog_since",
                             p + "layout"]
        self._layout_checked = False
        self._client = make_client(self.config)
        self._clock = ServerClock(self._client, self.config.socket_timeout)
        self._scripts = {name: self._client.register_script(text) for name, text in (
            ("register", scripts.REGISTER), ("heartbeat", scripts.HEARTBEAT),
            ("remove_instance", scripts.REMOVE_INSTANCE),
            ("remove_service", scripts.REMOVE_SERVICE),
            ("set_draining", scripts.SET_DRAINING), ("purge_expired", scripts.PURGE_EXPIRED),
            ("put_policy", scripts.PUT_POLICY), ("delete_policy", scripts.DELETE_POLICY),
            ("load", scripts.LOAD), ("changes", scripts.CHANGES), ("upgrade", scripts.UPGRADE),
        )}
        self._changes = ChangeSubscription(self._client, self.channel, self.description)
        self._empty_warning = Throttled(log)
        self._seen_data = False

    # -- plumbing --------------------------------------------------------------------------

    def _read(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a read-only script."""
        try:
            self._check_layout()
            return self._scripts[name](keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise StoreError(f"{self.description}: {exc}") from exc

    def _run(self, name: str, extra_keys: list[str], args: list[Any]) -> Any:
        """Run a registry write script: the common keys and arguments first, its deadline
        last."""
        try:
            self._check_layout()
            return self._scripts[name](
                keys=[*self._keys, *extra_keys],
                args=[self.config.prefix, self.channel, *args, self._clock.deadline()])
        except REDIS_ERRORS as exc:
            self._clock.forget()
            raise StoreError(f"{self.description}: {exc}") from exc

    def _check_layout(self) -> None:
        """Once per store object: bring a registry written before the change history up to
        the current layout (idempotent, atomic)."""
        if not self._layout_checked:
            self._scripts["upgrade"](keys=self._layout_keys, args=[self.config.prefix])
            self._layout_checked = True

    def _instance_key(self, service: str, instance_id: str) -> str:
        return f"{self._instance_prefix}{service}/{instance_id}"

    def close(self) -> None:
        self._changes.drop()
        try:
            self._client.connection_pool.disconnect()
        except REDIS_ERRORS:
            pass

    # -- reads -----------------------------------------------------------------------------

    def version(self) -> int:
        try:
            value = self._client.get(self._version_key)
        except REDIS_ERRORS as exc:
            raise StoreError(f"{self.description}: {exc}") from exc
        if value is None:
            if self._seen_data:
                self._empty_warning.warning(
                    "%s lost the registry (version key %r gone): was Redis restarted without"
                    " persistence (appendonly yes) or flushed? Instances must register again",
                    self.description, self._version_key)
            return 0
        self._seen_data = True
        return int(value)

    def load(self) -> StoreState:
        """Everything, without holding Redis for long: the instances are read in batches
        (``SSCAN`` and pipelined ``HGETALL``) from version V0 on, then the services changed
        since V0 are read again in one script and replace what the batches saw of them. A
        service no write touched meanwhile was read as it is; one that was touched comes from
        that script: the result is the registry at one version. When the history cannot say
        what changed since V0, one script reads it all (Redis is busy for that long)."""
        try:
            self._check_layout()
            since = int(self._client.get(self._version_key) or 0)
            seen: dict[str, Sequence[str]] = {}
            for batch in self._index_batches():
                pipe = self._client.pipeline(transaction=False)
                for member in batch:
                    pipe.hgetall(self._instance_prefix + member)
                for member, fields in zip(batch, pipe.execute(), strict=True):
                    if fields:
                        seen[member] = [x for pair in fields.items() for x in pair]
            policies = self._client.hgetall(self._policies_key)
        except REDIS_ERRORS as exc:
            raise StoreError(f"{self.description}: {exc}") from exc
        changed = self.changes(since)
        if changed is None:
            return self._load_at_once()
        records = {(r.service, r.id): r for r in (_record(m, f) for m, f in seen.items())
                   if r.service not in changed.services}
        records.update(((r.service, r.id), r) for r in changed.instances)
        docs: dict[str, dict[str, Any]] = {
            str(name): json.loads(body) for name, body in policies.items()
            if name not in changed.services}
        docs.update(changed.policies)
        return StoreState(version=changed.version, instances=tuple(records.values()),
                          policies=docs, now=changed.now)

    def _index_batches(self) -> Iterator[list[str]]:
        """The index's members, :data:`LOAD_BATCH` at a time (``SSCAN``: a member present
        throughout is returned at least once)."""
        cursor = 0
        while True:
            cursor, members = self._client.sscan(self._index_key, cursor, count=LOAD_BATCH)
            if members:
                yield [str(m) for m in members]
            if cursor == 0:
                return

    def _load_at_once(self) -> StoreState:
        version, seconds, micros, flat, policies = self._read(
            "load", [self._version_key, self._index_key, self._policies_key],
            [self._instance_prefix])
        instances = tuple(_record(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)
                          if flat[i + 1])
        return StoreState(
            version=int(version),
            instances=instances,
            policies={policies[i]: json.loads(policies[i + 1])
                      for i in range(0, len(policies), 2)},
            now=int(seconds) + int(micros) / 1e6,
        )

    def changes(self, since: int) -> StoreChanges | None:
        answer = self._read("changes", [self._version_key, self._policies_key, self._keys[4],
                                        self._keys[5]],
                            [self.config.prefix, str(since), MAX_INCREMENTAL_SERVICES])
        version, seconds, micros, known = answer[:4]
        if not known:
            return None
        names, flat, policies = answer[4:]
        return StoreChanges(
            version=int(version),
            services=frozenset(names),
            instances=tuple(_record(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)),
            policies={policies[i]: json.loads(policies[i + 1])
                      for i in range(0, len(policies), 2)},
            now=int(seconds) + int(micros) / 1e6,
        )

    def next_expiry(self) -> float | None:
        try:
            first = self._client.zrange(self._leases_key, 0, 0, withscores=True)
        except REDIS_ERRORS as exc:
            raise StoreError(f"{self.description}: {exc}") from exc
        return float(first[0][1]) / 1e6 if first else None

    # -- writes ----------------------------------------------------------------------------

    def register(self, record: InstanceRecord) -> tuple[InstanceRecord, bool]:
        created, flat = self._run(
            "register",
            [self._instance_key(record.service, record.id), self._service_prefix + record.service],
            [record.service, record.id, record.address, str(int(record.weight)),
             json.dumps(record.metadata, separators=(",", ":")),
             "" if record.ttl is None else repr(float(record.ttl))],
        )
        return _record(f"{record.service}/{record.id}", flat), bool(created)

    def heartbeat(self, service: str, instance_id: str) -> InstanceRecord | None:
        flat = self._run("heartbeat", [self._instance_key(service, instance_id)],
                         [service, instance_id])
        return _record(f"{service}/{instance_id}", flat) if flat else None

    def remove_instance(self, service: str, instance_id: str) -> InstanceRecord | None:
        flat = self._run("remove_instance", [self._instance_key(service, instance_id),
                                             self._service_prefix + service],
                         [service, instance_id])
        return _record(f"{service}/{instance_id}", flat) if flat else None

    def remove_service(self, service: str) -> list[InstanceRecord]:
        flat = self._run("remove_service", [self._service_prefix + service], [service])
        removed = [_record(f"{service}/{flat[i]}", flat[i + 1]) for i in range(0, len(flat), 2)]
        return sorted(removed, key=lambda r: (r.registered_at, r.id))

    def set_draining(self, service: str, instance_id: str,
                     draining: bool = True) -> InstanceRecord | None:
        flat = self._run("set_draining", [self._instance_key(service, instance_id)],
                         [service, "1" if draining else "0"])
        return _record(f"{service}/{instance_id}", flat) if flat else None

    def purge_expired(self) -> int:
        return int(self._run("purge_expired", [], []))

    def put_policy(self, service: str, policy: dict[str, Any]) -> None:
        self._run("put_policy", [], [service, json.dumps(policy, separators=(",", ":"))])

    def delete_policy(self, service: str) -> bool:
        return bool(self._run("delete_policy", [], [service]))

    # -- change notifications --------------------------------------------------------------

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Block on the change channel until a notification, ``timeout`` or ``stop`` (see
        :meth:`~gateway_app.stores.redis_pubsub.ChangeSubscription.wait`)."""
        self._changes.wait(timeout, stop)

    def make_health_board(self) -> HealthBoard:
        """Health shared by every node (see redis_health.py)."""
        from .redis_health import RedisBoard

        return RedisBoard(self.config)
