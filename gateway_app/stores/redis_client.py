"""Redis connections: the ``GATEWAY_STORE`` URL parsed, clients made from it, and where the
Redis server's clock stands (for the deadlines of writes).

Used by the store (:mod:`~gateway_app.stores.redis`) and the rate limiter
(:mod:`~gateway_app.redis_limiter`) alike; the URL's form and options are described there.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

DEFAULT_PREFIX = "gateway:"
#: Seconds: bounds on connecting to Redis and on each registry call.
DEFAULT_TIMEOUT = 1.0
#: Seconds: the same bounds for a rate-limit check, which is on the request path.
DEFAULT_RATE_LIMIT_TIMEOUT = 0.25
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


def make_client(config: RedisURL, timeout: float | None = None) -> redis.Redis:
    """A client for ``config`` without retries; ``timeout`` overrides both socket bounds."""
    socket_timeout = timeout or config.socket_timeout
    connect_timeout = timeout or config.socket_connect_timeout
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout,
        "retry": _no_retry(), "decode_responses": True,
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


#: What a failed call to Redis raises.
REDIS_ERRORS = (redis.RedisError, OSError)


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
