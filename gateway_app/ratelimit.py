"""Rate limiting: token buckets shared by every worker process of one gateway.

The buckets live in a small memory-mapped file in the data directory, so the limit holds across
gunicorn's workers instead of being multiplied by their number. The file is a fixed table of
slots (so its state is bounded); a slot whose bucket would have refilled completely is as good
as empty and is reused, so idle clients expire by themselves. A check takes the process's
thread lock and an ``flock`` on the file for a few microseconds: no I/O beyond the mapping.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

#: Slots in the table; each is one client's bucket for one scope. 65536 x 32 B = 2 MiB.
SLOTS = 65536
#: Slots probed from a key's home slot before the stalest one is taken over.
PROBES = 8
#: key hash, tokens, last update, the moment the bucket is full again.
_SLOT = struct.Struct("<Qddd")
#: A rate limit's N and its burst B are each 1 to this many tokens.
MAX_RATE_LIMIT = 10**9
#: The periods a limit may name, in seconds.
PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_PERIOD_NAMES = {seconds: name for name, seconds in PERIODS.items()}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour)\s*(?:,\s*burst\s*=?\s*(\d+))?\s*$",
                      re.ASCII)


class RateLimitError(ValueError):
    """A rate limit's text is malformed or out of bounds; the message names where it came
    from."""


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``burst`` tokens at most, refilled at ``rate`` tokens per second."""

    limit: int
    period: float
    burst: int

    @property
    def rate(self) -> float:
        return self.limit / self.period

    @property
    def period_name(self) -> str:
        """``second``, ``minute`` or ``hour``."""
        return _PERIOD_NAMES[self.period]


def parse_rate_limit(text: str, name: str = "rate_limit") -> RateLimit:
    """Parse ``N/second``, ``N/minute`` or ``N/hour``, optionally ``, burst=B``;
    :class:`RateLimitError` naming ``name`` otherwise."""
    match = _RATE_RE.match(text)
    if not match:
        raise RateLimitError(f"{name}: expected N/second, N/minute or N/hour (optionally "
                             f"', burst=B'), got {text[:64]!r}")
    counts = []
    for digits in (match.group(1), match.group(3) or match.group(1)):
        # The length first: int() of thousands of digits is slow, then refused outright.
        count = int(digits) if len(digits) <= 12 else 0
        if not 1 <= count <= MAX_RATE_LIMIT:
            raise RateLimitError(f"{name}: the limit and the burst must each be between 1 and "
                                 f"{MAX_RATE_LIMIT}, got {text[:64]!r}")
        counts.append(count)
    limit, burst = counts
    return RateLimit(limit=limit, period=PERIODS[match.group(2)], burst=burst)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    #: Seconds until the bucket is full again.
    reset: int
    #: Seconds until one token is available (when refused).
    retry_after: int

    @classmethod
    def after_take(cls, limit: RateLimit, allowed: bool, tokens: float) -> Decision:
        """The decision of a bucket of ``limit`` left with ``tokens`` by a take."""
        rate = limit.rate
        return cls(
            allowed=allowed,
            limit=limit.limit,
            remaining=int(tokens),
            reset=math.ceil((limit.burst - tokens) / rate),
            retry_after=max(1, math.ceil((1.0 - tokens) / rate)),
        )

    def headers(self) -> dict[str, str]:
        headers = {"RateLimit-Limit": str(self.limit),
                   "RateLimit-Remaining": str(self.remaining),
                   "RateLimit-Reset": str(self.reset)}
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class Limiter(Protocol):
    """What the proxy needs of a rate limiter."""

    def take(self, key: str, limit: RateLimit) -> Decision: ...

    def close(self) -> None: ...


def refused_credential_key(client: str) -> str:
    """The bucket of an address's requests refused for their token or credential."""
    return f"!token\x00{client}"


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") | 1


class SharedBuckets:
    """Token buckets in a file mapped by every worker process."""

    def __init__(self, path: Path, slots: int = SLOTS) -> None:
        self.path = path
        self.slots = slots
        self._lock = threading.Lock()
        self._pid = 0
        self._map: mmap.mmap | None = None
        self._fd = -1

    @staticmethod
    def reset(path: Path) -> None:
        """Empty the table (at gunicorn start, before workers fork)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb"):
            pass

    def _mapping(self) -> mmap.mmap:
        if self._map is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            size = self.slots * _SLOT.size
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, size)
            self._fd, self._pid = fd, os.getpid()
        return self._map

    def take(self, key: str, limit: RateLimit) -> Decision:
        """Take one token from ``key``'s bucket if there is one."""
        rate, capacity = limit.rate, float(limit.burst)
        wanted = _hash(key)
        with self._lock:
            table = self._mapping()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                now = time.monotonic()
                home = wanted % self.slots
                chosen, stalest, stalest_full_at = -1, home, math.inf
                tokens = capacity
                for i in range(PROBES):
                    index = (home + i) % self.slots
                    key_hash, t, last, full_at = _SLOT.unpack_from(table, index * _SLOT.size)
                    if key_hash == wanted:
                        chosen = index
                        if 0 <= now - last:
                            tokens = min(capacity, t + (now - last) * rate)
                        break
                    if key_hash == 0 or full_at <= now:  # empty, or idle long enough to be full
                        chosen = index if chosen < 0 else chosen
                    elif full_at < stalest_full_at:
                        stalest, stalest_full_at = index, full_at
                if chosen < 0:
                    chosen = stalest
                allowed = tokens >= 1.0
                if allowed:
                    tokens -= 1.0
                full_at = now + (capacity - tokens) / rate
                _SLOT.pack_into(table, chosen * _SLOT.size, wanted, tokens, now, full_at)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return Decision.after_take(limit, allowed, tokens)

    def close(self) -> None:
        with self._lock:
            if self._map is not None and self._pid == os.getpid():
                self._map.close()
                os.close(self._fd)
            self._map = None
