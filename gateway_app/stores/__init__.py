"""Stores: where the registry's truth lives (``memory://``, ``sqlite:///PATH``, ``redis://``)."""

from __future__ import annotations

from .base import InstanceRecord, Store, StoreChanges, StoreError, StoreState

__all__ = ["InstanceRecord", "Store", "StoreChanges", "StoreError", "StoreState", "check_url",
           "is_redis_url", "open_store"]

#: The URL schemes of a Redis store.
REDIS_SCHEMES = ("redis://", "rediss://", "redis+sentinel://")


def is_redis_url(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


def check_url(url: str) -> str:
    """Check a ``GATEWAY_STORE`` URL's form without opening anything; ``ValueError`` says
    what is wrong."""
    if url == "memory://":
        return url
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url
    if is_redis_url(url):
        from .redis_client import parse_url  # the form only: nothing connects here

        parse_url(url)
        return url
    raise ValueError(f"expected sqlite:///PATH, memory:// or redis://HOST:PORT/DB, got {url!r}")


def open_store(url: str) -> Store:
    """The store for a ``GATEWAY_STORE`` URL (already checked by :func:`check_url`)."""
    if url == "memory://":
        from .memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///"):])
    if is_redis_url(url):
        from .redis import RedisStore

        return RedisStore(url)
    raise ValueError(f"unknown store URL {url!r}")
