"""Rate limits in Redis: token buckets every gateway on one ``GATEWAY_STORE`` shares.

The app factory picks this limiter when the store is Redis (the per-machine
:class:`~gateway_app.ratelimit.SharedBuckets` otherwise). Buckets are kept under the store's
prefix (``ratelimit:HASH``), one atomic script per check, on the Redis server's clock.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable

from .ratelimit import Decision, RateLimit
from .stores.redis_client import REDIS_ERRORS, RedisURL, ServerClock, make_client
from .stores.redis_scripts import DEADLINE
from .throttle import Throttled

log = logging.getLogger("gateway.ratelimit")

#: Seconds the limiter leaves Redis alone after a failure (the circuit breaker).
BREAKER_SECONDS = 1.0

# The token bucket of ratelimit.SharedBuckets.take, on the Redis clock.
# KEYS: the bucket. ARGV: rate (tokens per second), burst, deadline.
_TAKE = DEADLINE + """
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
        self._warning = Throttled(log)

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
        try:
            allowed, text = self._script(keys=[self.key(key)], args=[
                repr(limit.rate), limit.burst, self._server_clock.deadline()])
        except REDIS_ERRORS as exc:
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
            log.warning("rate limits: Redis (%s) answers again", self.config.where)
        return Decision.after_take(limit, bool(allowed), float(text))

    def _fallback(self, limit: RateLimit) -> Decision:
        if self.fail_open:
            return Decision(allowed=True, limit=limit.limit, remaining=limit.burst, reset=0,
                            retry_after=1)
        return Decision(allowed=False, limit=limit.limit, remaining=0, reset=1, retry_after=1)

    def close(self) -> None:
        try:
            self._client.connection_pool.disconnect()
        except REDIS_ERRORS:
            pass
