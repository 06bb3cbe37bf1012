"""The health board in Redis: one health view for every node of a cluster (see healthboard.py).

Layout, under the store's prefix::

    health:version          string  the change counter of states
    health:state:KEY        string  the state of instance KEY ("SERVICE/ID"), JSON
    health:changed          zset    KEY scored by the version of its last change
    health:events:KEY       list    its timeline (JSON events), the last EVENTS_KEPT
    health:probe:KEY        string  the probe claim, expiring with it
    health:workers          hash    NODE/PID -> {"seen": ..., "counts": {KEY: n}}

An update reads the state, computes the new one in Python and commits it with a script that
checks the state is still what was read (compare and set), trying again when another process
changed it meanwhile: transitions are rare, so conflicts are too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TypeVar

import redis

from .base import StoreError
from .healthboard import EVENTS_KEPT, WORKER_STALE, Change, HealthBoard, encode_event
from .redis_client import RedisURL, make_client

T = TypeVar("T")

#: Tries of one update against concurrent ones.
UPDATE_TRIES = 20

# KEYS: state, version, changed, events. ARGV: expected state ("" for none), new state ("" to
# leave it), event ("" for none), member, events kept.
_COMMIT = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return -1 end
local version = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[2] ~= '' then
  version = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[3], version, ARGV[4])
end
if ARGV[3] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[5]), -1)
end
return version
"""

# KEYS: changed. ARGV: state prefix, events prefix, probe prefix, before, keys...
_FORGET = """
for i = 5, #ARGV do
  local key = ARGV[i]
  local state = redis.call('GET', ARGV[1] .. key)
  local updated = 0
  if state then updated = tonumber(cjson.decode(state)['updated'] or 0) end
  if updated < tonumber(ARGV[4]) then
    redis.call('DEL', ARGV[1] .. key, ARGV[2] .. key, ARGV[3] .. key)
    redis.call('ZREM', KEYS[1], key)
  end
end
return 0
"""

_ERRORS = (redis.RedisError, OSError, ValueError)


class RedisBoard(HealthBoard):
    """Health shared by every node using the same Redis and prefix."""

    def __init__(self, config: RedisURL) -> None:
        p = config.prefix + "health:"
        self._version_key = p + "version"
        self._state_prefix = p + "state:"
        self._changed_key = p + "changed"
        self._events_prefix = p + "events:"
        self._probe_prefix = p + "probe:"
        self._workers_key = p + "workers"
        self._client = make_client(config)
        self._commit = self._client.register_script(_COMMIT)
        self._forget = self._client.register_script(_FORGET)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except _ERRORS as exc:
            raise StoreError(f"redis health board: {exc}") from exc

    def version(self) -> int:
        return int(self._call(self._client.get, self._version_key) or 0)

    def changed(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        def read() -> tuple[int, dict[str, dict[str, Any]]]:
            version = int(self._client.get(self._version_key) or 0)
            keys = self._client.zrangebyscore(self._changed_key, f"({since}", "+inf")
            return version, self._states([str(k) for k in keys])
        return self._call(read)  # type: ignore[no-any-return]

    def _states(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            values = self._client.mget([self._state_prefix + k for k in chunk])
            found.update({k: json.loads(v) for k, v in zip(chunk, values, strict=True) if v})
        return found

    def states(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = list(keys)
        return self._call(self._states, wanted) if wanted else {}  # type: ignore[no-any-return]

    def update(self, key: str, change: Change[T]) -> tuple[T, dict[str, Any]]:
        def run() -> tuple[T, dict[str, Any]]:
            for _ in range(UPDATE_TRIES):
                raw = self._client.get(self._state_prefix + key) or ""
                current = json.loads(raw) if raw else {}
                state, event, result = change(dict(current))
                done = self._commit(
                    keys=[self._state_prefix + key, self._version_key, self._changed_key,
                          self._events_prefix + key],
                    args=[raw, json.dumps(state, separators=(",", ":")) if state else "",
                          encode_event(event) if event else "", key, EVENTS_KEPT])
                if int(done) >= 0:
                    return result, (state if state is not None else current)
            raise StoreError(f"health of {key}: too many concurrent updates")
        return self._call(run)  # type: ignore[no-any-return]

    def events(self, key: str) -> list[dict[str, Any]]:
        rows = self._call(self._client.lrange, self._events_prefix + key, 0, -1)
        return [json.loads(e) for e in rows]

    def forget(self, keys: Iterable[str], before: float) -> None:
        gone = list(keys)
        for i in range(0, len(gone), 500):
            self._call(lambda chunk=gone[i:i + 500]: self._forget(
                keys=[self._changed_key],
                args=[self._state_prefix, self._events_prefix, self._probe_prefix, before,
                      *chunk]))

    def keys(self) -> set[str]:
        return set(self._call(self._client.zrange, self._changed_key, 0, -1))

    def claim(self, key: str, now: float, seconds: float) -> bool:
        return bool(self._call(lambda: self._client.set(
            self._probe_prefix + key, "1", nx=True, px=max(1, int(seconds * 1000)))))

    def report(self, worker: str, counts: dict[str, int], now: float) -> None:
        self._call(self._client.hset, self._workers_key, worker,
                   json.dumps({"seen": now, "counts": counts}))

    def in_flight(self, now: float) -> dict[str, int]:
        rows = self._call(self._client.hgetall, self._workers_key)
        total: dict[str, int] = {}
        stale = []
        for worker, text in rows.items():
            row = json.loads(text)
            if row["seen"] < now - WORKER_STALE:
                if row["seen"] < now - 60 * WORKER_STALE:
                    stale.append(worker)
                continue
            for key, n in row["counts"].items():
                total[key] = total.get(key, 0) + n
        if stale:
            self._call(self._client.hdel, self._workers_key, *stale)
        return total

    def close(self) -> None:
        try:
            self._client.close()
        except _ERRORS:
            pass
