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
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import RateLimit

#: Slots in the table; each is one client's bucket for one scope. 65536 x 32 B = 2 MiB.
SLOTS = 65536
#: Slots probed from a key's home slot before the stalest one is taken over.
PROBES = 8
#: key hash, tokens, last update, the moment the bucket is full again.
_SLOT = struct.Struct("<Qddd")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    #: Seconds until the bucket is full again.
    reset: int
    #: Seconds until one token is available (when refused).
    retry_after: int

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
        rate, capacity = limit.rate, float(limit.capacity)
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
        return Decision(
            allowed=allowed,
            limit=limit.limit,
            remaining=int(tokens),
            reset=math.ceil((capacity - tokens) / rate),
            retry_after=max(1, math.ceil((1.0 - tokens) / rate)),
        )

    def close(self) -> None:
        with self._lock:
            if self._map is not None and self._pid == os.getpid():
                self._map.close()
                os.close(self._fd)
            self._map = None
