"""Stores: where the registry's truth lives (``memory://``, ``sqlite:///PATH``, ``redis://``)."""

from __future__ import annotations

from .base import InstanceRecord, Store, StoreChanges, StoreError, StoreState

__all__ = ["InstanceRecord", "Store", "StoreChanges", "StoreError", "StoreState", "open_store"]


def open_store(url: str) -> Store:
    """The store for a ``GATEWAY_STORE`` URL (already validated by the config)."""
    if url == "memory://":
        from .memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///"):])
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from .redis import RedisStore

        return RedisStore(url)
    raise ValueError(f"unknown store URL {url!r}")
