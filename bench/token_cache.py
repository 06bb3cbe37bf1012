"""The token cache: microseconds per verify with a full cache, and what big tokens cost.

Run from the repository root (so this checkout's ``gateway_app`` is the one measured)::

    python -m bench.token_cache

It prints, for a :class:`~gateway_app.auth.TokenVerifier` whose cache is full of small tokens:

- ``hit``: a cached token verified again, the path of nearly every proxied request;
- ``miss``: a new token each time, so each verify also evicts (the finding of issue 10: once
  the cache was full, every new token scanned all of it);

then fills a fresh verifier past its capacity with tokens of about 7.8 KB and prints the
entries it kept, its own estimate of their bytes, and how much the process's RSS grew.

Figures for a person to compare before and after a change; nothing here asserts on time. On
a shared machine, run the two versions alternately, several times, and compare the best
rounds: a single run can be off by a third.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import jwt

from gateway_app import auth
from gateway_app.auth import TokenVerifier
from gateway_app.config import load_settings

SECRET = "bench-secret-that-is-long-enough-0123456789"
ROUNDS = 7


def _verifier() -> TokenVerifier:
    return TokenVerifier(load_settings({"GATEWAY_JWT_SECRET": SECRET}), SECRET.encode())


def _tokens(prefix: str, pad: int = 0) -> Iterator[str]:
    now = int(time.time())
    i = 0
    while True:
        claims = {"sub": f"{prefix}-{i}", "iat": now, "exp": now + 3600}
        if pad:
            claims["groups"] = "g" * pad
        yield jwt.encode(claims, SECRET, algorithm="HS256")
        i += 1


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _per_call_us(fn: Callable[[str], object], tokens: list[str]) -> float:
    start = time.perf_counter()
    for token in tokens:
        fn(token)
    return (time.perf_counter() - start) / len(tokens) * 1e6


def full_cache() -> None:
    verifier = _verifier()
    fresh = _tokens("user")
    for _ in range(auth.CACHE_SIZE):
        verifier.verify(next(fresh))
    hot = next(fresh)
    verifier.verify(hot)
    hits, misses = [], []
    for _ in range(ROUNDS):
        hits.append(_per_call_us(verifier.verify, [hot] * 200_000))
        misses.append(_per_call_us(verifier.verify, [next(fresh) for _ in range(2_000)]))
    print(f"full cache ({len(verifier._cache)} entries): "
          f"hit {min(hits) * 1000:.0f} ns (median {statistics.median(hits) * 1000:.0f}), "
          f"miss {min(misses):.1f} us (median {statistics.median(misses):.1f}) per verify, "
          f"best of {ROUNDS} rounds")


def big_tokens() -> None:
    before = _rss_kib()
    verifier = _verifier()
    fresh = _tokens("big", pad=5800)
    token = ""
    for _ in range(auth.CACHE_SIZE + 2_000):
        token = next(fresh)
        verifier.verify(token)
    estimate = getattr(verifier, "_cache_bytes", None)
    print(f"{auth.CACHE_SIZE + 2_000} tokens of {len(token)} B: {len(verifier._cache)} kept, "
          f"estimated {'-' if estimate is None else f'{estimate / 2**20:.1f} MiB'}, "
          f"RSS +{(_rss_kib() - before) / 1024:.0f} MiB")


if __name__ == "__main__":
    full_cache()
    big_tokens()
