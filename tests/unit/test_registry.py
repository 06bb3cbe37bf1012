"""The registry when its store fails: start anyway, keep serving, keep leases."""

import time

from gateway_app.registry import Registry
from gateway_app.stores import InstanceRecord, StoreError
from gateway_app.stores.memory import MemoryStore
from gateway_app.validation import instance_id


class FlakyStore(MemoryStore):
    """A memory store that can be switched off, like a Redis that went away."""

    def __init__(self):
        super().__init__()
        self.down = False

    def _check(self):
        if self.down:
            raise StoreError("connection refused")

    def version(self):
        self._check()
        return super().version()

    def load(self):
        self._check()
        return super().load()


def test_registry_starts_with_the_store_down_and_catches_up():
    store = FlakyStore()
    store.down = True
    registry = Registry(store, refresh_interval=0.01)
    try:
        assert registry.snapshot().services == {}
        store.down = False
        store.register(InstanceRecord(service="svc", id=instance_id("http://a:1"),
                                      address="http://a:1"))
        deadline = time.monotonic() + 2
        while "svc" not in registry.snapshot().services and time.monotonic() < deadline:
            time.sleep(0.01)  # the watcher's own period
        assert "svc" in registry.snapshot().services
    finally:
        registry.close()


def test_leases_do_not_lapse_while_the_store_is_down(monkeypatch):
    store = FlakyStore()
    registry = Registry(store, refresh_interval=3600)  # the test drives refresh() itself
    try:
        registry.register("svc", "http://a:1", ttl=10)
        instance = registry.snapshot().services["svc"].instances[0]
        store.down = True
        registry.watch_step()  # the watcher finds the store gone
        later = time.time() + 60
        monkeypatch.setattr(time, "time", lambda: later)
        assert instance.live(registry.now())  # frozen at the outage: no heartbeat could pass
        assert registry.snapshot().services["svc"].choose(registry.now()) is instance
        store.down = False
        registry.watch_step()  # back: the lease is judged by the clock again
        assert not instance.live(registry.now())
    finally:
        registry.close()
