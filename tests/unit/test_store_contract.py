"""One contract for every store: memory, SQLite and Redis answer the same calls the same way."""

from __future__ import annotations

import time

import pytest

from gateway_app.stores import InstanceRecord, Store
from gateway_app.stores.memory import MemoryStore
from gateway_app.stores.sqlite import SQLiteStore
from tests.redis_support import SharedPrefix, require_shared_redis
from tests.support import wait_for


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        opened: Store = MemoryStore()
        yield opened
        return
    if request.param == "sqlite":
        opened = SQLiteStore(str(tmp_path / "registry.db"))
        yield opened
        opened.close()
        return
    require_shared_redis()
    from gateway_app.stores.redis import RedisStore

    space = SharedPrefix()
    opened = RedisStore(space.url)
    yield opened
    opened.close()
    space.cleanup()


def rec(service="svc", id_="i1", address="http://10.0.0.1:80", **fields) -> InstanceRecord:
    return InstanceRecord(service=service, id=id_, address=address, **fields)


def test_register_new_then_again_keeps_registered_at_and_undoes_a_drain(store):
    before = time.time()
    first, new = store.register(rec(ttl=30, weight=2, metadata={"zone": "a"}))
    assert new is True
    assert (first.service, first.id, first.address, first.weight, first.metadata) == (
        "svc", "i1", "http://10.0.0.1:80", 2, {"zone": "a"})
    assert first.ttl == 30 and first.draining is False
    assert before - 2 <= first.registered_at <= time.time() + 2
    assert first.expires_at == pytest.approx(first.registered_at + 30, abs=1e-3)

    store.set_draining("svc", "i1")
    again, new = store.register(rec(address="http://10.0.0.1:80", weight=5, metadata={}))
    assert new is False
    assert again.registered_at == first.registered_at
    assert again.draining is False  # re-registering brings a drained instance back
    assert (again.weight, again.metadata, again.ttl, again.expires_at) == (5, {}, None, None)
    [loaded] = store.load().instances
    assert loaded == again


def test_heartbeat(store):
    assert store.heartbeat("svc", "nope") is None
    leaseless, _ = store.register(rec())
    version = store.version()
    assert store.heartbeat("svc", "i1") == leaseless  # harmless, and no change
    assert store.version() == version

    leased, _ = store.register(rec(id_="i2", ttl=60))
    version = store.version()
    renewed = store.heartbeat("svc", "i2")
    assert renewed.expires_at >= leased.expires_at
    assert renewed.registered_at == leased.registered_at
    assert store.version() > version


def test_remove_instance_and_service(store):
    assert store.remove_instance("svc", "i1") is None
    assert store.remove_service("svc") == []
    store.register(rec(id_="a"))
    store.register(rec(id_="b"))
    store.register(rec(service="other", id_="c"))
    removed = store.remove_instance("svc", "a")
    assert (removed.service, removed.id) == ("svc", "a")
    assert store.remove_instance("svc", "a") is None
    version = store.version()
    assert [r.id for r in store.remove_service("svc")] == ["b"]
    assert store.version() > version
    assert [(r.service, r.id) for r in store.load().instances] == [("other", "c")]


def test_set_draining_and_undo_it(store):
    assert store.set_draining("svc", "i1") is None
    assert store.set_draining("svc", "i1", False) is None
    store.register(rec())
    version = store.version()
    assert store.set_draining("svc", "i1", False).draining is False  # not draining: no change
    assert store.version() == version
    drained = store.set_draining("svc", "i1")
    assert drained.draining is True
    assert store.load().instances[0].draining is True
    version = store.version()
    undone = store.set_draining("svc", "i1", False)
    assert undone.draining is False
    assert store.load().instances[0].draining is False
    assert store.version() > version


def test_purge_expired_removes_lapsed_leases_only(store):
    store.register(rec(id_="short", ttl=0.2))
    store.register(rec(id_="long", ttl=3600))
    store.register(rec(id_="forever"))
    version = store.version()
    assert store.purge_expired() == 0
    assert store.version() == version
    wait_for(lambda: store.purge_expired() == 1, 5, 0.05, "the short lease to be purged")
    assert sorted(r.id for r in store.load().instances) == ["forever", "long"]
    assert store.version() > version


def test_policies(store):
    assert store.delete_policy("svc") is False
    store.put_policy("svc", {"rate_limit": "5/second", "request_headers": {"add": {"X": "1"}}})
    store.put_policy("svc", {"rate_limit": "6/second"})  # replaces
    store.put_policy("later", {"auth": "none"})  # a policy needs no instance
    assert store.load().policies == {"svc": {"rate_limit": "6/second"},
                                     "later": {"auth": "none"}}
    assert store.delete_policy("svc") is True
    assert store.load().policies == {"later": {"auth": "none"}}


def test_every_change_moves_the_version_and_nothing_else_does(store):
    seen = [store.version()]

    def changed() -> None:
        seen.append(store.version())
        assert seen[-1] != seen[-2]

    store.register(rec(ttl=60))
    changed()
    store.heartbeat("svc", "i1")
    changed()
    store.set_draining("svc", "i1")
    changed()
    store.set_draining("svc", "i1", False)
    changed()
    store.set_draining("svc", "i1")
    changed()
    store.register(rec(ttl=60))  # undoes the drain
    changed()
    store.put_policy("svc", {"auth": "none"})
    changed()
    store.delete_policy("svc")
    changed()
    store.remove_instance("svc", "i1")
    changed()
    store.register(rec())
    changed()
    store.remove_service("svc")
    changed()
    for no_op in (lambda: store.heartbeat("svc", "i1"), lambda: store.remove_instance("svc", "x"),
                  lambda: store.remove_service("svc"), lambda: store.set_draining("svc", "x"),
                  lambda: store.delete_policy("svc"), store.purge_expired):
        no_op()
        assert store.version() == seen[-1]


def test_load_is_one_consistent_state(store):
    store.register(rec(id_="a", ttl=60))
    store.put_policy("svc", {"strip_prefix": False})
    state = store.load()
    assert state.version == store.version()
    assert abs(state.now - time.time()) < 5
    assert [(r.id, r.ttl) for r in state.instances] == [("a", 60)]
    assert state.policies == {"svc": {"strip_prefix": False}}


def test_changes_since_a_version_name_the_services_touched_and_their_state(store):
    store.register(rec(service="a", id_="a1", ttl=60))
    store.register(rec(service="b", id_="b1"))
    store.register(rec(service="c", id_="c1"))
    store.put_policy("p", {"auth": "none"})
    since = store.version()
    quiet = store.changes(since)
    assert (quiet.version, quiet.services, quiet.instances, quiet.policies) == (
        since, frozenset(), (), {})

    store.register(rec(service="a", id_="a2"))         # a: one more instance
    store.remove_service("b")                          # b: gone
    store.put_policy("c", {"strip_prefix": False})     # c: a policy, same instances
    store.delete_policy("p")                           # p: policy gone, never had instances
    store.heartbeat("zzz", "none")                     # no change
    changes = store.changes(since)
    assert changes.version == store.version() > since
    assert changes.services == frozenset({"a", "b", "c", "p"})
    assert sorted((r.service, r.id) for r in changes.instances) == [
        ("a", "a1"), ("a", "a2"), ("c", "c1")]
    assert changes.policies == {"c": {"strip_prefix": False}}
    assert abs(changes.now - time.time()) < 5
    # from a later version, only what came after it
    later = store.version()
    store.set_draining("c", "c1")
    only_c = store.changes(later)
    assert only_c.services == frozenset({"c"})
    assert [r.draining for r in only_c.instances] == [True]


def test_changes_cannot_answer_for_a_version_it_does_not_know(store):
    store.register(rec())
    assert store.changes(store.version() + 5) is None  # a store that lost its data
    assert store.changes(-1) is None                   # a worker that never loaded


def test_purged_leases_are_changes_and_next_expiry_is_the_earliest(store):
    assert store.next_expiry() is None
    store.register(rec(id_="forever"))
    assert store.next_expiry() is None
    short, _ = store.register(rec(service="brief", id_="short", ttl=0.2))
    long, _ = store.register(rec(id_="long", ttl=3600))
    assert store.next_expiry() == pytest.approx(short.expires_at, abs=1e-3)
    since = store.version()
    wait_for(lambda: store.purge_expired() == 1, 5, 0.05, "the short lease to be purged")
    assert store.next_expiry() == pytest.approx(long.expires_at, abs=1e-3)
    changes = store.changes(since)
    assert changes.services == frozenset({"brief"}) and changes.instances == ()
