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


def test_a_registry_that_could_not_load_is_not_ready_and_retries_by_itself():
    store = FlakyStore()
    store.register(InstanceRecord(service="svc", id=instance_id("http://a:1"),
                                  address="http://a:1"))
    store.down = True
    registry = Registry(store, refresh_interval=0.01)
    try:
        assert not registry.snapshot().loaded  # not an empty registry to serve from
        assert "not been loaded" in registry.not_ready_reason()
        assert "connection refused" in registry.not_ready_reason()
        store.down = False
        deadline = time.monotonic() + 2
        while not registry.snapshot().loaded and time.monotonic() < deadline:
            time.sleep(0.01)
        assert registry.snapshot().loaded and "svc" in registry.snapshot().services
        assert registry.not_ready_reason() is None
    finally:
        registry.close()


def test_a_worker_not_loaded_answers_503_not_404_and_says_so_on_ready(make_app, auth,
                                                                      monkeypatch):
    app = make_app()
    client = app.test_client()
    assert client.post("/register_service", data="svc,http://127.0.0.1:9").status_code == 201
    ready = client.get("/_gateway/ready", environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert (ready.status_code, ready.get_json()) == (200, {"status": "ready"})

    registry = app.extensions["gateway"].registry
    from gateway_app.registry import EMPTY

    def down(*args):
        raise StoreError("connection refused")

    for method in ("version", "load", "changes"):  # the watcher cannot load it back
        monkeypatch.setattr(registry.store, method, down, raising=False)
    monkeypatch.setattr(registry, "_snapshot", EMPTY)  # as a worker whose first load failed
    for path in ("/svc/", "/unknown/x"):
        response = client.get(path, headers=auth)
        assert response.status_code == 503
        assert response.get_json()["error"] == "registry_not_ready"
        assert response.headers["Retry-After"] == "1"
    ready = client.get("/_gateway/ready", environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert ready.status_code == 503
    assert ready.get_json()["status"] == "not_ready" and ready.get_json()["reason"]


def test_ready_turns_503_first_when_the_worker_stops(make_app):
    app = make_app()
    client = app.test_client()
    assert client.get("/_gateway/ready").status_code == 200
    app.extensions["gateway"].begin_shutdown()
    ready = client.get("/_gateway/ready")
    assert ready.status_code == 503
    assert ready.get_json() == {"status": "not_ready", "reason": "this worker is shutting down"}
    assert client.get("/_gateway/health").status_code == 200  # still alive


class CountingStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.loads = 0

    def load(self):
        self.loads += 1
        return super().load()


def test_a_write_updates_the_snapshot_incrementally():
    store = CountingStore()
    for n in range(50):
        store.register(InstanceRecord(service=f"s{n:02d}", id=instance_id(f"http://a:{n + 1}"),
                                      address=f"http://a:{n + 1}"))
    registry = Registry(store, refresh_interval=3600)  # the test drives the watcher itself
    try:
        loads = store.loads
        before = registry.snapshot()
        registry.register("s07", "http://b:1", ttl=30)
        registry.put_policy("s08", {"balancing": "random"})
        registry.remove_service("s09")
        registry.register("new", "http://c:1")
        after = registry.snapshot()
        assert store.loads == loads  # no reload of the whole table
        assert after.services["s10"] is before.services["s10"]  # untouched: the same object
        assert [i.address for i in after.services["s07"].instances] == ["http://a:8",
                                                                        "http://b:1"]
        assert after.services["s08"].strategy == "random"
        assert "s09" not in after.services and "new" in after.services
        assert after.next_expiry is not None
        assert list(after.names) == sorted(after.services)
        # another process's writes reach it the same way
        store.register(InstanceRecord(service="other", id=instance_id("http://d:1"),
                                      address="http://d:1"))
        registry.refresh()
        assert "other" in registry.snapshot().services and store.loads == loads
        assert before.services["s10"] is registry.snapshot().services["s10"]
        assert "s09" in before.services  # an old snapshot never changes
    finally:
        registry.close()


def test_close_waits_for_the_watcher_before_closing_the_store():
    events = []

    class SlowStore(MemoryStore):
        def version(self):
            events.append("version")
            time.sleep(0.2)
            events.append("version done")
            return super().version()

        def close(self):
            events.append("close")

    registry = Registry(SlowStore(), refresh_interval=0.01)
    deadline = time.monotonic() + 2
    while "version" not in events[1:] and time.monotonic() < deadline:
        time.sleep(0.01)
    while events[-1] != "version" and time.monotonic() < deadline + 2:
        time.sleep(0.005)  # until the watcher is inside a store call
    registry.close()
    assert events[-2:] == ["version done", "close"]


def test_a_committed_write_is_acknowledged_even_if_reading_it_back_fails():
    """The store took the write: answering 503 because the snapshot could not be brought up
    to date afterwards would be an error answer for a write that took effect."""
    store = FlakyStore()
    registry = Registry(store, refresh_interval=0.01)
    try:
        real_changes = store.changes

        def changes_down(since):
            raise StoreError("connection reset")

        store.changes = changes_down
        record, created = registry.register("svc", "http://a:1")  # no StoreUnavailable
        assert created and record.service == "svc"
        store.changes = real_changes
        deadline = time.monotonic() + 2
        while "svc" not in registry.snapshot().services and time.monotonic() < deadline:
            time.sleep(0.01)  # the watcher catches up
        assert "svc" in registry.snapshot().services
    finally:
        registry.close()
