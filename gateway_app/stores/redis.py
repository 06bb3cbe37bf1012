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
    changes                 channel  the new version, published by every change

Every write is one Lua script, so it is atomic and its clock is the Redis server's ``TIME``
(leases lapse at the same moment for every node, whatever their clocks say). Each carries a
deadline on that clock, and changes nothing when it runs later (see :class:`ServerClock`): a
write whose caller was answered with an error never takes effect afterwards. A script that
changes something bumps ``version`` and publishes it on ``changes``; one that changes nothing
leaves both alone. When ``version`` does not exist (a new or wiped Redis) the first write sets
it from the server clock in microseconds, so versions never repeat after a data loss.

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

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..ratelimit import Decision
from .base import CHANGE_HISTORY, InstanceRecord, Store, StoreChanges, StoreError, StoreState

if TYPE_CHECKING:
    from ..config import RateLimit, Settings
    from .healthboard import HealthBoard

log = logging.getLogger("gateway.store")

DEFAULT_PREFIX = "gateway:"
#: Seconds: bounds on connecting to Redis and on each registry call.
DEFAULT_TIMEOUT = 1.0
#: Seconds: the same bounds for a rate-limit check, which is on the request path.
DEFAULT_RATE_LIMIT_TIMEOUT = 0.25
#: Seconds the limiter leaves Redis alone after a failure (the circuit breaker).
BREAKER_SECONDS = 1.0
#: Seconds between two pub/sub subscription attempts after one failed.
RESUBSCRIBE_SECONDS = 1.0
#: Seconds between two warnings about the same trouble.
WARN_EVERY = 30.0
#: Services changed since a worker's version above which it loads everything instead.
MAX_INCREMENTAL_SERVICES = 1000
#: Instances read per round trip by a full load.
LOAD_BATCH = 500
#: Seconds an estimate of where the Redis clock stands is used before it is measured again.
CLOCK_MAX_AGE = 10.0
#: How fast the Redis clock and ours may drift apart (NTP slews by at most 500 ppm).
CLOCK_DRIFT = 500e-6
#: ``TIME`` round trips per measurement at most, and the uncertainty (half a round trip, in
#: seconds) that ends it early.
CLOCK_TRIES = 3
CLOCK_GOOD_ENOUGH = 0.002
#: Seconds a write's deadline falls before its caller gives up (its socket timeout), at most:
#: room for the script's answer to come back in time.
DEADLINE_MARGIN = 0.1

# -- Lua ---------------------------------------------------------------------------------------

# Every write script starts with this. Its last ARGV is the write's deadline on the Redis
# clock (microseconds): a script that runs later than that (Redis was hung and has resumed;
# the caller gave up and answered 503) changes nothing and fails.
_DEADLINE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
if now_us() > tonumber(ARGV[#ARGV]) then
  return redis.error_reply('LATE the write arrived after its deadline; nothing was changed')
end
"""

# Every registry write script also starts with this. KEYS[1..6] are the same for all of them:
# version, index, leases, policies, changelog, changelog_since; ARGV[1] is the key prefix and
# ARGV[2] the notification channel.
_COMMON = _DEADLINE + f"local HISTORY = {CHANGE_HISTORY}\n" + """
local P = ARGV[1]
local function fmt(n) return string.format('%.0f', n) end
-- A change: bump the version, note it for each service touched, publish it.
local function bump(services)
  local v = redis.call('INCR', KEYS[1])
  if v == 1 then  -- a new or wiped registry: versions go on from the clock; a new history
    v = now_us()
    redis.call('SET', KEYS[1], fmt(v))
    redis.call('DEL', KEYS[5], P .. 'changelog_versions')
    redis.call('SET', KEYS[6], fmt(v - 1))
  end
  for _, name in ipairs(services) do redis.call('ZADD', KEYS[5], fmt(v), name) end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', fmt(v - HISTORY))
  -- every version noted: a version without a note (a write by a gateway of the older layout)
  -- shows as a gap, and a worker then loads everything
  redis.call('ZADD', P .. 'changelog_versions', fmt(v), fmt(v))
  redis.call('ZREMRANGEBYSCORE', P .. 'changelog_versions', '-inf', fmt(v - HISTORY))
  redis.call('PUBLISH', ARGV[2], fmt(v))
end
"""

# KEYS: common, instance, service set. ARGV: common, service, id, address, weight, metadata,
# ttl, deadline.
_REGISTER = _COMMON + """
local member = ARGV[3] .. '/' .. ARGV[4]
local now = now_us()
local registered = redis.call('HGET', KEYS[7], 'registered_at')
local created = 0
if not registered then
  created = 1
  registered = fmt(now)
end
local expires = ''
if ARGV[8] ~= '' then
  expires = fmt(now + math.floor(tonumber(ARGV[8]) * 1000000 + 0.5))
  redis.call('ZADD', KEYS[3], expires, member)
else
  redis.call('ZREM', KEYS[3], member)
end
redis.call('HSET', KEYS[7], 'address', ARGV[5], 'weight', ARGV[6], 'metadata', ARGV[7],
           'ttl', ARGV[8], 'registered_at', registered, 'expires_at', expires,
           'draining', '0')
redis.call('SADD', KEYS[2], member)
redis.call('SADD', KEYS[8], ARGV[4])
bump({ARGV[3]})
return {created, redis.call('HGETALL', KEYS[7])}
"""

# KEYS: common, instance. ARGV: common, service, id, deadline.
_HEARTBEAT = _COMMON + """
local ttl = redis.call('HGET', KEYS[7], 'ttl')
if not ttl then return false end
if ttl ~= '' then
  local expires = fmt(now_us() + math.floor(tonumber(ttl) * 1000000 + 0.5))
  redis.call('HSET', KEYS[7], 'expires_at', expires)
  redis.call('ZADD', KEYS[3], expires, ARGV[3] .. '/' .. ARGV[4])
  bump({ARGV[3]})
end
return redis.call('HGETALL', KEYS[7])
"""

# KEYS: common, instance, service set. ARGV: common, service, id, deadline.
_REMOVE_INSTANCE = _COMMON + """
local record = redis.call('HGETALL', KEYS[7])
if #record == 0 then return false end
local member = ARGV[3] .. '/' .. ARGV[4]
redis.call('DEL', KEYS[7])
redis.call('SREM', KEYS[2], member)
redis.call('ZREM', KEYS[3], member)
redis.call('SREM', KEYS[8], ARGV[4])
bump({ARGV[3]})
return record
"""

# KEYS: common, service set. ARGV: common, service, deadline.
_REMOVE_SERVICE = _COMMON + """
local removed = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[7])) do
  local member = ARGV[3] .. '/' .. id
  local key = P .. 'instance:' .. member
  local record = redis.call('HGETALL', key)
  if #record > 0 then
    removed[#removed + 1] = id
    removed[#removed + 1] = record
  end
  redis.call('DEL', key)
  redis.call('SREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
end
redis.call('DEL', KEYS[7])
if #removed > 0 then bump({ARGV[3]}) end
return removed
"""

# KEYS: common, instance. ARGV: common, service, "1" to drain or "0" to undo it, deadline.
_SET_DRAINING = _COMMON + """
local draining = redis.call('HGET', KEYS[7], 'draining')
if not draining then return false end
if draining ~= ARGV[4] then
  redis.call('HSET', KEYS[7], 'draining', ARGV[4])
  bump({ARGV[3]})
end
return redis.call('HGETALL', KEYS[7])
"""

# KEYS: common. ARGV: common, deadline.
_PURGE_EXPIRED = _COMMON + """
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', fmt(now_us()))
local services, seen = {}, {}
for _, member in ipairs(due) do
  local slash = string.find(member, '/', 1, true)
  local service = string.sub(member, 1, slash - 1)
  redis.call('DEL', P .. 'instance:' .. member)
  redis.call('SREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('SREM', P .. 'service:' .. service, string.sub(member, slash + 1))
  if not seen[service] then
    seen[service] = true
    services[#services + 1] = service
  end
end
if #due > 0 then bump(services) end
return #due
"""

# KEYS: common. ARGV: common, service, body, deadline.
_PUT_POLICY = _COMMON + """
if redis.call('HGET', KEYS[4], ARGV[3]) == ARGV[4] then return 0 end
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
bump({ARGV[3]})
return 1
"""

# KEYS: common. ARGV: common, service, deadline.
_DELETE_POLICY = _COMMON + """
if redis.call('HDEL', KEYS[4], ARGV[3]) == 0 then return 0 end
bump({ARGV[3]})
return 1
"""

# KEYS: version, index, policies. ARGV: instance key prefix.
_LOAD = """
local t = redis.call('TIME')
local instances = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  instances[#instances + 1] = member
  instances[#instances + 1] = redis.call('HGETALL', ARGV[1] .. member)
end
return {redis.call('GET', KEYS[1]) or '0', t[1], t[2], instances,
        redis.call('HGETALL', KEYS[3])}
"""

# What changed after a version: {version, seconds, micros, known (0 or 1), names, instances
# ("SERVICE/ID", fields, ...), policies (service, body, ...)}. Not known: a version older than
# the history or newer than the store, a version since then that left no note (a write by a
# gateway of the older layout), or more services than ARGV[3]: the caller loads everything.
# KEYS: version, policies, changelog, changelog_since. ARGV: prefix, since, max services.
_CHANGES = f"local HISTORY = {CHANGE_HISTORY}\n" + """
local t = redis.call('TIME')
local version = redis.call('GET', KEYS[1]) or '0'
local v, since = tonumber(version), tonumber(ARGV[2])
local floor = redis.call('GET', KEYS[4])
if not floor or since < math.max(tonumber(floor), v - HISTORY) or since > v then
  return {version, t[1], t[2], 0}
end
if since == v then return {version, t[1], t[2], 1, {}, {}, {}} end
local noted = redis.call('ZCOUNT', ARGV[1] .. 'changelog_versions', '(' .. ARGV[2], version)
if noted ~= v - since then return {version, t[1], t[2], 0} end
local names = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '+inf')
if #names > tonumber(ARGV[3]) then return {version, t[1], t[2], 0} end
local instances, policies = {}, {}
for _, name in ipairs(names) do
  for _, id in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'service:' .. name)) do
    local record = redis.call('HGETALL', ARGV[1] .. 'instance:' .. name .. '/' .. id)
    if #record > 0 then
      instances[#instances + 1] = name .. '/' .. id
      instances[#instances + 1] = record
    end
  end
  local body = redis.call('HGET', KEYS[2], name)
  if body then
    policies[#policies + 1] = name
    policies[#policies + 1] = body
  end
end
return {version, t[1], t[2], 1, names, instances, policies}
"""

# Once per store, for a registry written by a gateway before the change history: a set of
# instance ids per service, from the index, and the history starting at the current version.
# KEYS: version, index, changelog_since, layout. ARGV: prefix.
_UPGRADE = """
if redis.call('GET', KEYS[4]) == '2' then return 0 end
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local slash = string.find(member, '/', 1, true)
  redis.call('SADD', ARGV[1] .. 'service:' .. string.sub(member, 1, slash - 1),
             string.sub(member, slash + 1))
end
redis.call('SET', KEYS[3], redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[4], '2')
return 1
"""

# The token bucket of ratelimit.SharedBuckets.take, on the Redis clock.
# KEYS: the bucket. ARGV: rate (tokens per second), capacity, deadline.
_TAKE = _DEADLINE + """
local now = now_us()
local rate = tonumber(ARGV[1]) / 1000000
local capacity = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = capacity
if state[1] and state[2] then
  tokens = tonumber(state[1])
  local elapsed = now - tonumber(state[2])
  if elapsed >= 0 then tokens = math.min(capacity, tokens + elapsed * rate) end
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
local text = string.format('%.17g', tokens)
redis.call('HSET', KEYS[1], 'tokens', text, 'ts', string.format('%.0f', now))
-- Gone once it would be full again: a missing bucket is a full one.
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate / 1000) + 1000)
return {allowed, text}
"""


# -- URLs and clients --------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisURL:
    """A parsed ``GATEWAY_STORE`` Redis URL."""

    #: ``redis``, ``rediss`` or ``redis+sentinel``.
    scheme: str
    prefix: str
    socket_timeout: float
    socket_connect_timeout: float
    rate_limit_timeout: float
    #: For ``redis``/``rediss``: the URL handed to redis-py (our own options removed).
    url: str = field(default="", repr=False)
    #: For ``redis+sentinel``.
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    options: dict[str, str] = field(default_factory=dict)
    #: Host, port and database, for messages (never the password).
    where: str = ""


def _seconds(options: dict[str, str], key: str, default: float) -> float:
    text = options.pop(key, None)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"option {key}: expected seconds, got {text!r}") from None
    if not 0 < value <= 60:
        raise ValueError(f"option {key}: must be more than 0 and at most 60, got {text!r}")
    return value


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def parse_url(url: str) -> RedisURL:
    """Parse a Redis store URL without connecting; ValueError says what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "redis+sentinel"):
        raise ValueError("expected redis://, rediss:// or redis+sentinel://,"
                         f" got {_redact(url)!r}")
    if parts.fragment:
        raise ValueError("a Redis URL takes no #fragment")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix = options.pop("prefix", DEFAULT_PREFIX)
    if not prefix:
        raise ValueError("option prefix: must not be empty")
    socket_timeout = _seconds(options, "socket_timeout", DEFAULT_TIMEOUT)
    connect_timeout = _seconds(options, "socket_connect_timeout", socket_timeout)
    rate_limit_timeout = _seconds(options, "rate_limit_timeout",
                                  min(DEFAULT_RATE_LIMIT_TIMEOUT, socket_timeout))
    sentinel_password = options.pop("sentinel_password", None)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    common: dict[str, Any] = {
        "prefix": prefix, "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout, "rate_limit_timeout": rate_limit_timeout,
    }

    if scheme == "redis+sentinel":
        segments = [s for s in parts.path.split("/") if s]
        if not hosts or not segments or len(segments) > 2:
            raise ValueError("expected redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]"
                             f"/SERVICE_NAME[/DB], got {_redact(url)!r}")
        sentinels = tuple(_host_port(h.strip(), 26379) for h in hosts.split(",") if h.strip())
        db = _db(segments[1] if len(segments) > 1 else "0")
        if options:
            raise ValueError("the Sentinel form takes only the options prefix, socket_timeout,"
                             " socket_connect_timeout, rate_limit_timeout and sentinel_password;"
                             f" got {', '.join(sorted(options))}")
        return RedisURL(
            scheme=scheme, sentinels=sentinels, service_name=unquote(segments[0]), db=db,
            username=unquote(username) or None, password=unquote(password) or None,
            sentinel_password=sentinel_password, options=options,
            where=f"sentinel {hosts} service {unquote(segments[0])} db {db}", **common,
        )

    if not hosts:
        raise ValueError(f"missing host in {_redact(url)!r}")
    _host_port(hosts, 6379)  # checked here; redis-py parses it again
    path = parts.path.strip("/")
    db = _db(options.get("db", path or "0"))
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(options), ""))
    try:  # redis-py's own options: build (not connect) a connection to check them now
        pool = redis.ConnectionPool.from_url(clean)
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad option in {_redact(url)!r}: {exc}") from None
    return RedisURL(scheme=scheme, url=clean, db=db, options=options,
                    where=f"{scheme}://{hosts}/{db}", **common)


def _db(text: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise ValueError(f"the database must be a number, got {text!r}") from None
    if db < 0:
        raise ValueError(f"the database must be 0 or more, got {db}")
    return db


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def make_client(config: RedisURL, timeout: float | None = None,
                decode_responses: bool = True) -> redis.Redis:
    """A client for ``config`` without retries; ``timeout`` overrides both socket bounds."""
    socket_timeout = timeout or config.socket_timeout
    connect_timeout = timeout or config.socket_connect_timeout
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout,
        "retry": _no_retry(), "decode_responses": decode_responses,
    }
    if config.scheme == "redis+sentinel":
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout,
            "retry": _no_retry(),
        }
        if config.sentinel_password:
            sentinel_kwargs["password"] = config.sentinel_password
        sentinel = Sentinel(list(config.sentinels), sentinel_kwargs=sentinel_kwargs,
                            **config.options)
        return sentinel.master_for(config.service_name, db=config.db,
                                   username=config.username, password=config.password,
                                   **kwargs)
    pool = redis.ConnectionPool.from_url(config.url, **kwargs)
    return redis.Redis(connection_pool=pool)


_REDIS_ERRORS = (redis.RedisError, OSError)


class ServerClock:
    """Where the Redis server's clock (``TIME``) stands against this process's monotonic
    clock, for the deadlines of writes.

    A write is sent with a deadline on the Redis clock, a little before its caller gives up
    waiting (``timeout``, the socket timeout). The script checks it against ``TIME`` before
    changing anything. So a write whose caller was answered with an error (Redis hung, the
    socket timed out) and which Redis runs later, once it resumes, changes nothing: a write
    answered 503 never takes effect afterwards. The offset is measured with one ``TIME`` round
    trip, at most every :data:`CLOCK_MAX_AGE` seconds, and the deadline is moved earlier by
    the measurement's uncertainty (half its round trip) and the drift since.
    """

    def __init__(self, client: redis.Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._margin = min(DEADLINE_MARGIN, timeout / 4)
        self._lock = threading.Lock()
        #: Redis time minus our monotonic time, the measurement's uncertainty, and when it
        #: was measured (monotonic); ``None`` until measured.
        self._estimate: tuple[float, float, float] | None = None

    def deadline(self) -> str:
        """The deadline, in microseconds on the Redis clock, for a write sent now."""
        estimate = self._estimate
        now = time.monotonic()
        if estimate is None or now - estimate[2] > CLOCK_MAX_AGE:
            estimate = self._measure()
            now = time.monotonic()
        offset, uncertainty, measured = estimate
        uncertainty += (now - measured) * CLOCK_DRIFT
        return str(int((now + offset + self._timeout - self._margin - uncertainty) * 1e6))

    def _measure(self) -> tuple[float, float, float]:
        """The best of a few ``TIME`` round trips (a busy machine makes some slow, and a slow
        one makes a deadline earlier than it need be)."""
        with self._lock:
            best: tuple[float, float, float] | None = None
            for _ in range(CLOCK_TRIES):
                before = time.monotonic()
                seconds, micros = self._client.time()
                after = time.monotonic()
                if best is None or (after - before) / 2 < best[1]:
                    best = (seconds + micros / 1e6 - (before + after) / 2,
                            (after - before) / 2, after)
                if best[1] < CLOCK_GOOD_ENOUGH:
                    break
            assert best is not None
            self._estimate = best
            return best

    def forget(self) -> None:
        """Measure again before the next write (after an error: Redis may have failed over
        to another server, with another clock)."""
        self._estimate = None


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


class _Throttled:
    """Log a warning at most once per ``every`` seconds."""

    def __init__(self, logger: logging.Logger, every: float = WARN_EVERY) -> None:
        self.logger, self.every, self.last = logger, every, -math.inf

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.logger.warning(message, *args)


# -- the store ---------------------------------------------------------------------------------


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
        scripts = {name: self._client.register_script(text) for name, text in (
            ("register", _REGISTER), ("heartbeat", _HEARTBEAT),
            ("remove_instance", _REMOVE_INSTANCE), ("remove_service", _REMOVE_SERVICE),
            ("set_draining", _SET_DRAINING), ("purge_expired", _PURGE_EXPIRED),
            ("put_policy", _PUT_POLICY), ("delete_policy", _DELETE_POLICY), ("load", _LOAD),
            ("changes", _CHANGES), ("upgrade", _UPGRADE),
        )}
        self._scripts = scripts
        self._sub_lock = threading.Lock()
        self._pubsub: Any = None
        self._pubsub_pid = 0
        self._resubscribe_at = 0.0
        self._sub_warning = _Throttled(log)
        self._empty_warning = _Throttled(log)
        self._seen_data = False

    # -- plumbing --------------------------------------------------------------------------

    def _read(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a read-only script."""
        try:
            self._check_layout()
            return self._scripts[name](keys=keys, args=args)
        except _REDIS_ERRORS as exc:
            raise StoreError(f"{self.description}: {exc}") from exc

    def _run(self, name: str, extra_keys: list[str], args: list[Any]) -> Any:
        """Run a registry write script: the common keys and arguments first, its deadline
        last."""
        try:
            self._check_layout()
            return self._scripts[name](
                keys=[*self._keys, *extra_keys],
                args=[self.config.prefix, self.channel, *args, self._clock.deadline()])
        except _REDIS_ERRORS as exc:
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
        self._drop_subscription()
        try:
            self._client.connection_pool.disconnect()
        except _REDIS_ERRORS:
            pass

    # -- reads -----------------------------------------------------------------------------

    def version(self) -> int:
        try:
            value = self._client.get(self._version_key)
        except _REDIS_ERRORS as exc:
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
        except _REDIS_ERRORS as exc:
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
        except _REDIS_ERRORS as exc:
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

    def _subscription(self) -> Any:
        """The subscription to the change channel, (re)made when due; ``None`` while Redis
        cannot be reached."""
        with self._sub_lock:
            if self._pubsub is not None and self._pubsub_pid == os.getpid():
                return self._pubsub
            self._pubsub = None  # inherited over fork: the parent's, leave it alone
            if time.monotonic() < self._resubscribe_at:
                return None
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
            except _REDIS_ERRORS as exc:
                self._resubscribe_at = time.monotonic() + RESUBSCRIBE_SECONDS
                _close_quietly(pubsub)
                self._sub_warning.warning("%s: cannot subscribe to %s (%s); polling the "
                                          "version until it can", self.description,
                                          self.channel, exc)
                return None
            self._pubsub, self._pubsub_pid = pubsub, os.getpid()
            return pubsub

    def _drop_subscription(self) -> None:
        with self._sub_lock:
            pubsub, self._pubsub = self._pubsub, None
            self._resubscribe_at = time.monotonic() + RESUBSCRIBE_SECONDS
        if pubsub is not None and self._pubsub_pid == os.getpid():
            _close_quietly(pubsub)

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Block on the change channel until a notification, ``timeout`` or ``stop``.

        Never raises: a broken subscription is dropped (and remade a second later) and the
        rest of ``timeout`` is waited out; the version check that follows catches up.
        """
        deadline = time.monotonic() + timeout
        try:
            pubsub = self._subscription()
            while pubsub is not None and not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                message = pubsub.get_message(ignore_subscribe_messages=True,
                                             timeout=min(remaining, 0.5))
                if message is not None:
                    for _ in range(100):  # a burst of writes: one version check for all
                        if pubsub.get_message(ignore_subscribe_messages=True) is None:
                            break
                    return
        except Exception as exc:  # noqa: BLE001 (the watcher must survive anything)
            if not stop.is_set():
                self._sub_warning.warning("%s: change subscription lost (%s); polling the "
                                          "version until it is back", self.description, exc)
            self._drop_subscription()
        remaining = deadline - time.monotonic()
        if remaining > 0:
            stop.wait(remaining)

    # -- rate limits -----------------------------------------------------------------------

    def make_limiter(self, settings: Settings) -> RedisLimiter:
        return RedisLimiter(self.config, fail_open=settings.rate_limit_fail_open)

    def make_health_board(self) -> HealthBoard:
        """Health shared by every node (see redis_health.py)."""
        from .redis_health import RedisBoard

        return RedisBoard(self.config)


def _close_quietly(pubsub: Any) -> None:
    try:
        pubsub.close()
    except Exception:  # noqa: BLE001, S110 (closing a broken connection may fail too)
        pass


# -- the limiter -------------------------------------------------------------------------------


class RedisLimiter:
    """Token buckets in Redis: one atomic script per check, so every node shares the limit.

    When Redis cannot answer (within ``rate_limit_timeout``) the check allows the request
    (``fail_open``) or refuses it, with a warning at most every 30 s; then a circuit breaker
    leaves Redis alone for ``breaker_seconds`` so that an outage does not cost every request
    a timeout, after which one request probes Redis again.
    """

    def __init__(self, config: RedisURL, fail_open: bool = True,
                 breaker_seconds: float = BREAKER_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.fail_open = fail_open
        self.breaker_seconds = breaker_seconds
        self._clock = clock
        self._prefix = config.prefix + "ratelimit:"
        self._client = make_client(config, timeout=config.rate_limit_timeout)
        self._server_clock = ServerClock(self._client, config.rate_limit_timeout)
        self._script = self._client.register_script(_TAKE)
        self._lock = threading.Lock()
        self._failing = False
        self._open_until = -math.inf
        self._warning = _Throttled(logging.getLogger("gateway.ratelimit"))

    def key(self, key: str) -> str:
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return self._prefix + digest

    def take(self, key: str, limit: RateLimit) -> Decision:
        if self._failing:
            with self._lock:  # half-open: one request probes, the others keep the fallback
                now = self._clock()
                if now < self._open_until:
                    return self._fallback(limit)
                self._open_until = now + self.breaker_seconds
        rate, capacity = limit.rate, float(limit.capacity)
        try:
            allowed, text = self._script(keys=[self.key(key)], args=[
                repr(rate), limit.capacity, self._server_clock.deadline()])
        except _REDIS_ERRORS as exc:
            self._server_clock.forget()
            with self._lock:
                self._failing = True
                self._open_until = self._clock() + self.breaker_seconds
            self._warning.warning(
                "rate limits: Redis (%s) did not answer (%s); %s requests until it does"
                " (GATEWAY_RATE_LIMIT_ON_ERROR=%s)", self.config.where, exc,
                "allowing" if self.fail_open else "refusing",
                "open" if self.fail_open else "closed")
            return self._fallback(limit)
        if self._failing:
            with self._lock:
                self._failing = False
                self._open_until = -math.inf
            logging.getLogger("gateway.ratelimit").warning(
                "rate limits: Redis (%s) answers again", self.config.where)
        tokens = float(text)
        return Decision(
            allowed=bool(allowed),
            limit=limit.limit,
            remaining=int(tokens),
            reset=math.ceil((capacity - tokens) / rate),
            retry_after=max(1, math.ceil((1.0 - tokens) / rate)),
        )

    def _fallback(self, limit: RateLimit) -> Decision:
        if self.fail_open:
            return Decision(allowed=True, limit=limit.limit, remaining=limit.capacity, reset=0,
                            retry_after=1)
        return Decision(allowed=False, limit=limit.limit, remaining=0, reset=1, retry_after=1)

    def close(self) -> None:
        try:
            self._client.connection_pool.disconnect()
        except _REDIS_ERRORS:
            pass
