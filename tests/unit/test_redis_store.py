"""The Redis store and limiter against real Redis: the shared server for the semantics, private
``redis-server`` processes for outages, durability, Sentinel and TLS."""

from __future__ import annotations

import datetime
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway_app import build_limiter, create_app
from gateway_app.config import ConfigError, load_settings
from gateway_app.ratelimit import parse_rate_limit
from gateway_app.redis_limiter import RedisLimiter
from gateway_app.stores import InstanceRecord, StoreError, open_store
from gateway_app.stores.redis import RedisStore
from gateway_app.stores.redis_client import parse_url
from tests.conftest import SECRET, make_token
from tests.redis_support import (
    RedisServer,
    SilentServer,
    require_redis_server,
)
from tests.support import free_port, wait_for

CLOSED = "redis://127.0.0.1:{port}/0?socket_timeout=0.5"


@pytest.fixture
def stores(space):
    """Open Redis stores on the test's prefix ("nodes"); closed after the test."""
    opened: list[RedisStore] = []

    def open_one() -> RedisStore:
        store = RedisStore(space.url)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def closed_url():
    return CLOSED.format(port=free_port())  # nothing listens there


def rec(id_="i1", service="svc", **fields) -> InstanceRecord:
    return InstanceRecord(service=service, id=id_, address=f"http://10.0.0.1/{id_}", **fields)


# -- URLs --------------------------------------------------------------------------------------


def test_url_forms_and_our_own_options():
    plain = parse_url("redis://127.0.0.1:6379/3?prefix=p:&socket_timeout=2")
    assert (plain.prefix, plain.db, plain.socket_timeout, plain.socket_connect_timeout) == (
        "p:", 3, 2.0, 2.0)
    assert plain.url == "redis://127.0.0.1:6379/3"  # our options are not handed to redis-py
    assert plain.rate_limit_timeout == 0.25
    default = parse_url("redis://cache")
    assert (default.prefix, default.db, default.socket_timeout) == ("gateway:", 0, 1.0)

    tls = parse_url("rediss://:s3cret@cache:6380/1?ssl_cert_reqs=none&rate_limit_timeout=0.1")
    assert tls.url == "rediss://:s3cret@cache:6380/1?ssl_cert_reqs=none"
    assert tls.rate_limit_timeout == 0.1
    assert "s3cret" not in tls.where and "s3cret" not in repr(tls)

    sentinel = parse_url("redis+sentinel://:pw@s1:26379,s2,[::1]:5000/mymaster/2"
                         "?sentinel_password=spw&prefix=gw:")
    assert sentinel.sentinels == (("s1", 26379), ("s2", 26379), ("::1", 5000))
    assert (sentinel.service_name, sentinel.db, sentinel.password) == ("mymaster", 2, "pw")
    assert (sentinel.sentinel_password, sentinel.prefix) == ("spw", "gw:")
    assert "pw" not in sentinel.where


@pytest.mark.parametrize("url", [
    "redis://h:port/0", "redis://h/db", "redis:///0", "redis://h/0?prefix=",
    "redis://h/0?socket_timeout=0", "redis://h/0?socket_timeout=soon", "redis://h/0?bogus=1",
    "redis+sentinel://h:26379/", "redis+sentinel://h/m/0?ssl=true", "redis://h/0#frag",
])
def test_bad_urls_stop_the_start_with_the_variable_named(url):
    with pytest.raises(ConfigError, match="GATEWAY_STORE"):
        load_settings({"GATEWAY_STORE": url})


# -- store semantics beyond the shared contract (tests/unit/test_store_contract.py) -------------


def test_keys_live_under_the_prefix_and_versions_count_every_change(stores, space):
    store = stores()
    assert store.version() == 0  # nothing there yet
    store.register(rec(ttl=60))
    start = store.version()
    assert start > 10**15  # the first write starts from the Redis clock, in microseconds
    store.heartbeat("svc", "i1")
    store.set_draining("svc", "i1")
    store.set_draining("svc", "i1")  # already draining: no change
    store.put_policy("svc", {"auth": "none"})
    store.put_policy("svc", {"auth": "none"})  # the same policy: no change
    assert store.version() == start + 3
    assert store.load().version == start + 3
    assert space.keys() == [space.prefix + k for k in (
        "changelog", "changelog_since", "changelog_versions", "index", "instance:svc/i1",
        "layout", "leases",
        "policies", "service:svc", "version")]


def test_leases_run_on_the_redis_clock_not_the_node_clock(stores, space, monkeypatch):
    store = stores()
    redis_now = space.client.time()
    redis_now = redis_now[0] + redis_now[1] / 1e6
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # this node runs an hour fast
    record, _ = store.register(rec(ttl=60))
    assert record.registered_at == pytest.approx(redis_now, abs=2)
    assert record.expires_at == pytest.approx(record.registered_at + 60, abs=1e-3)
    assert store.purge_expired() == 0  # lapsed by the node's clock, not by the store's
    assert store.load().now == pytest.approx(redis_now, abs=2)
    member = "svc/i1"
    assert space.client.zscore(space.prefix + "leases", member) == pytest.approx(
        record.expires_at * 1e6, abs=1)


def test_two_nodes_see_one_registry(stores):
    one, two = stores(), stores()
    one.register(rec(ttl=30, metadata={"zone": "a"}))
    two.put_policy("svc", {"rate_limit": "1/second"})
    first, second = one.load(), two.load()
    assert (first.version, first.instances, first.policies) == (
        second.version, second.instances, second.policies)
    again, new = two.register(rec())
    assert new is False
    assert two.remove_instance("svc", "i1") == again
    assert one.load().instances == ()


def test_concurrent_registrations_from_many_nodes_lose_nothing(stores):
    nodes = [stores() for _ in range(4)]
    nodes[0].register(rec(id_="warm"))
    start = nodes[0].version()

    def register(n: int) -> bool:
        _, new = nodes[n % 4].register(rec(id_=f"i{n}", ttl=60, weight=1 + n % 7))
        return new

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(register, range(400)))
    assert all(results)
    state = nodes[1].load()
    assert len(state.instances) == 401
    assert {r.id: r.weight for r in state.instances if r.id != "warm"} == {
        f"i{n}": 1 + n % 7 for n in range(400)}
    assert state.version == start + 400  # one atomic increment per write, none lost


def test_concurrent_changes_to_one_instance_stay_whole(stores):
    one, two = stores(), stores()
    one.register(rec(ttl=60))

    def churn(n: int) -> None:
        node = (one, two)[n % 2]
        if n % 3 == 0:
            node.heartbeat("svc", "i1")
        elif n % 3 == 1:
            node.register(rec(ttl=60, weight=1 + n % 5))
        else:
            node.set_draining("svc", "i1")

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(churn, range(300)))
    [record] = one.load().instances
    assert record.ttl == 60  # drained or not: whichever of drain and register came last
    assert record.expires_at == pytest.approx(record.registered_at + 60, abs=30)


def test_wait_for_change_wakes_on_a_write_from_another_node(stores):
    watcher, writer = stores(), stores()
    stop = threading.Event()
    watcher.wait_for_change(0.05, stop)  # subscribes
    timer = threading.Timer(0.2, lambda: writer.put_policy("svc", {"auth": "none"}))
    started = time.monotonic()
    timer.start()
    watcher.wait_for_change(5.0, stop)
    elapsed = time.monotonic() - started
    timer.join()
    assert 0.15 < elapsed < 1.5
    # nothing written: it waits the whole timeout
    started = time.monotonic()
    watcher.wait_for_change(0.3, stop)
    assert time.monotonic() - started >= 0.29
    stop.set()
    started = time.monotonic()
    watcher.wait_for_change(5.0, stop)
    assert time.monotonic() - started < 0.1


def test_an_unreachable_redis_fails_every_call_quickly_with_store_error(closed_url):
    store = open_store(closed_url)
    calls = [store.version, store.load, lambda: store.register(rec()),
             lambda: store.heartbeat("svc", "i1"), lambda: store.remove_instance("svc", "i1"),
             lambda: store.remove_service("svc"), lambda: store.set_draining("svc", "i1"),
             store.purge_expired, lambda: store.put_policy("svc", {}),
             lambda: store.delete_policy("svc")]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreError, match="redis store"):
            call()
        assert time.monotonic() - started < 1.0
    stop = threading.Event()
    started = time.monotonic()
    store.wait_for_change(0.2, stop)  # never raises: waits like a store without notifications
    assert 0.19 <= time.monotonic() - started < 1.0
    store.close()


def test_an_outage_fails_writes_cleanly_and_the_store_recovers_by_itself(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        url = server.url + "?socket_timeout=0.5"
        store, other = RedisStore(url), RedisStore(url)
        stop = threading.Event()
        store.register(rec())
        store.wait_for_change(0.05, stop)  # subscribed
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreError):
            store.register(rec(id_="during"))
        with pytest.raises(StoreError):
            store.version()
        assert time.monotonic() - started < 1.0
        store.wait_for_change(0.1, stop)  # the broken subscription is dropped, not raised

        server.start()  # same port, data gone (no persistence)
        wait_for(lambda: _works(store), 5, 0.05, "the store to reconnect")
        assert [r.id for r in store.load().instances] == ["after"]
        # the subscription is made again: a write elsewhere wakes the watcher early
        wait_for(lambda: _woken_by(store, other), 5, 0.05, "the change subscription to return")
        store.close()
        other.close()
    finally:
        server.stop()


def test_a_write_that_timed_out_on_a_paused_redis_never_takes_effect_later(tmp_path):
    """Redis hung (SIGSTOP) holds the commands sent to it; when it resumes it would run them.
    Every write carries a deadline checked against Redis's TIME: one whose caller was told it
    failed is refused when it finally runs."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        url = server.url + "?socket_timeout=0.3&prefix=paused:"
        store = RedisStore(url)
        limiter = RedisLimiter(parse_url(url), fail_open=False)
        store.register(rec("steady", ttl=3600))
        store.register(rec("drained"))
        store.set_draining("svc", "drained")
        store.register(rec("short", service="brief", ttl=1))
        store.put_policy("svc", {"auth": "none"})
        store.put_policy("other", {"auth": "none"})
        limit = parse_rate_limit("5/hour")
        assert limiter.take("client", limit).remaining == 4
        before = store.load()

        # each write on a node of its own whose connection is open, as a busy gateway's is
        # (a new connection to a paused Redis hangs in its handshake and sends nothing)
        nodes = [RedisStore(url) for _ in range(10)]
        for node in nodes:
            node.heartbeat("svc", "none")  # connects; changes nothing
        writes = [
            lambda: nodes[0].register(rec("late", ttl=60)),
            lambda: nodes[1].register(rec("steady", weight=9)),
            lambda: nodes[2].heartbeat("svc", "steady"),
            lambda: nodes[3].set_draining("svc", "steady"),
            lambda: nodes[4].set_draining("svc", "drained", False),
            lambda: nodes[5].remove_instance("svc", "steady"),
            lambda: nodes[6].remove_service("svc"),
            lambda: nodes[7].put_policy("svc", {"auth": "jwt"}),
            lambda: nodes[8].delete_policy("other"),
            nodes[9].purge_expired,  # "brief/short" lapses during the pause
        ]
        server.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.1)
            for write in writes:
                with pytest.raises(StoreError):
                    write()
            assert limiter.take("client", limit).allowed is False  # fails closed
        finally:
            server.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: _loads(store), 5, 0.05, "Redis to answer again")
        time.sleep(0.2)  # whatever Redis held has run by now
        after = store.load()
        def by_key(state):
            return sorted(state.instances, key=lambda r: (r.service, r.id))

        assert by_key(after) == by_key(before)
        assert after.policies == before.policies
        assert after.version == before.version
        fresh = RedisLimiter(parse_url(url))  # (the first one's breaker is open for a second)
        assert fresh.take("client", limit).remaining == 3  # one token taken before, not two
        fresh.close()
        for node in nodes:
            node.close()
        limiter.close()
        store.close()
    finally:
        server.stop()


def _works(store: RedisStore) -> bool:
    try:
        store.register(rec(id_="after"))
    except StoreError:
        return False
    return True


def _woken_by(watcher: RedisStore, writer: RedisStore) -> bool:
    stop = threading.Event()
    watcher.wait_for_change(0.01, stop)
    timer = threading.Timer(0.05, lambda: writer.put_policy("svc", {"n": time.time()}))
    timer.start()
    started = time.monotonic()
    watcher.wait_for_change(0.5, stop)
    timer.join()
    return time.monotonic() - started < 0.3


def test_acknowledged_writes_survive_a_redis_kill_9_with_aof(tmp_path):
    args = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")
    server = RedisServer(tmp_path / "aof", args=args).start()
    try:
        store = RedisStore(server.url)
        store.register(rec(ttl=3600, metadata={"k": "v"}))
        store.put_policy("svc", {"auth": "none"})
        before = store.load()
        server.kill9()  # right after the acknowledgement
        server.start()
        wait_for(lambda: _loads(store), 5, 0.05, "Redis to come back")
        after = store.load()
        def by_key(state):
            return sorted(state.instances, key=lambda r: (r.service, r.id))

        assert by_key(after) == by_key(before)
        assert after.policies == before.policies
        assert after.version == before.version
        store.close()
    finally:
        server.stop()


def _loads(store: RedisStore) -> bool:
    try:
        store.load()
    except StoreError:
        return False
    return True


def test_sentinel_url_finds_the_master(tmp_path):
    server = RedisServer(tmp_path / "master").start()
    sentinel_port = free_port()
    conf = tmp_path / "sentinel" / "sentinel.conf"
    conf.parent.mkdir()
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {conf.parent}\n"
                    f"sentinel monitor gw 127.0.0.1 {server.port} 1\n")
    sentinel = RedisServer(conf.parent, sentinel_port,
                           argv=[server.binary, str(conf), "--sentinel"])
    try:
        sentinel.start()
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/gw/0?prefix=s:"
        store = open_store(url)
        record, new = store.register(rec())
        assert new and store.load().instances == (record,)
        limiter = build_limiter(load_settings({"GATEWAY_STORE": url}))
        assert isinstance(limiter, RedisLimiter)
        assert limiter.take("k", parse_rate_limit("1/hour")).allowed is True
        assert limiter.take("k", parse_rate_limit("1/hour")).allowed is False
        limiter.close()
        store.close()
    finally:
        sentinel.stop()
        server.stop()


def test_rediss_url_speaks_tls(tmp_path):
    ca, cert, key = _certificates(tmp_path)
    port = free_port()
    work = tmp_path / "tls"
    server = RedisServer(work, port, client={"host": "localhost", "ssl": True,
                                             "ssl_ca_certs": str(ca)}, argv=[
        require_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(work), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"])
    server.start()
    try:
        store = open_store(f"rediss://localhost:{port}/0?ssl_ca_certs={ca}&prefix=tls:")
        record, new = store.register(rec())
        assert new and store.load().instances == (record,)
        store.close()
        unverified = open_store(f"rediss://localhost:{port}/0?prefix=tls:")  # system CAs
        with pytest.raises(StoreError):
            unverified.version()
        unverified.close()
    finally:
        server.stop()


def _certificates(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(name("test CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# -- the limiter -------------------------------------------------------------------------------


@pytest.fixture
def limiters(space):
    """Limiters on the shared Redis (a take waits up to 5 s for it: see SharedPrefix), or on
    the test's own URL; closed after the test."""
    opened: list[RedisLimiter] = []

    def open_one(url: str | None = None, **kwargs) -> RedisLimiter:
        limiter = RedisLimiter(parse_url(url or space.url), **kwargs)
        opened.append(limiter)
        return limiter

    yield open_one
    for limiter in opened:
        limiter.close()


def test_bucket_capacity_and_decision_fields(limiters):
    limiter = limiters()
    limit = parse_rate_limit("5/minute")
    decisions = [limiter.take("alice", limit) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert [d.limit for d in decisions] == [5] * 6
    assert decisions[0].reset == 12 and decisions[4].reset == 60
    assert decisions[5].retry_after == 12
    assert limiter.take("bob", limit).allowed is True  # one bucket per key
    burst = parse_rate_limit("1/hour, burst=3")
    assert [limiter.take("carol", burst).allowed for _ in range(4)] == [True] * 3 + [False]


def test_bucket_refills_at_the_rate(limiters):
    limiter = limiters()
    # 2 a second: the bucket is emptied well within the 0.5 s a token takes to come back, even
    # on a busy machine (at 10 a second, ten takes could outlast a refill)
    limit = parse_rate_limit("2/second")
    started = time.monotonic()  # the bucket is full (2) at the first take, after this
    assert all(limiter.take("k", limit).allowed for _ in range(2))
    refused = limiter.take("k", limit)
    assert not refused.allowed and refused.retry_after == 1
    wait_for(lambda: limiter.take("k", limit).allowed, 10, 0.01, "a token to come back")
    assert time.monotonic() - started >= 0.45  # one token takes 0.5 s at 2/s (+ clock slack)


def test_idle_buckets_expire_by_themselves(limiters, space):
    limiter = limiters()
    limiter.take("k", parse_rate_limit("60/minute"))
    [key] = [k for k in space.keys() if ":ratelimit:" in k]
    assert key == limiter.key("k")
    assert 0 < space.client.pttl(key) <= 2000  # full again after 1 s (+ margin)


def test_two_nodes_share_one_limit(limiters):
    nodes = [limiters(), limiters()]
    limit = parse_rate_limit("20/hour")

    def take(n: int) -> bool:
        return nodes[n % 2].take("shared", limit).allowed

    with ThreadPoolExecutor(max_workers=16) as pool:
        allowed = sum(pool.map(take, range(100)))
    assert allowed == 20  # not 20 per node


def test_fail_open_and_fail_closed_when_redis_is_unreachable(limiters, closed_url, caplog):
    limit = parse_rate_limit("1/hour")
    with caplog.at_level(logging.WARNING, "gateway.ratelimit"):
        opened = limiters(closed_url, fail_open=True)
        decisions = [opened.take("k", limit) for _ in range(5)]
        assert all(d.allowed for d in decisions)
        closed = limiters(closed_url, fail_open=False)
        refused = closed.take("k", limit)
    assert (refused.allowed, refused.retry_after, refused.remaining) == (False, 1, 0)
    assert refused.headers()["Retry-After"] == "1"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # one per limiter, not one per request
    assert "allowing requests" in warnings[0] and "ON_ERROR=open" in warnings[0]
    assert "refusing requests" in warnings[1]


def test_circuit_breaker_skips_redis_for_a_while_then_probes(limiters, space):
    now = [1000.0]
    limiter = limiters(fail_open=False, clock=lambda: now[0])
    real_script, calls = limiter._script, []

    def broken(**kwargs):
        calls.append(kwargs)
        import redis

        raise redis.ConnectionError("down")

    limiter._script = broken
    limit = parse_rate_limit("100/second")
    assert limiter.take("k", limit).allowed is False
    assert limiter.take("k", limit).allowed is False
    now[0] += 0.5
    assert limiter.take("k", limit).allowed is False
    assert len(calls) == 1  # the breaker is open: Redis is left alone
    now[0] += 0.6
    assert limiter.take("k", limit).allowed is False
    assert len(calls) == 2  # one probe after the pause, which failed: open again
    limiter._script = real_script
    assert limiter.take("k", limit).allowed is False
    now[0] += 1.1
    assert limiter.take("k", limit).allowed is True  # Redis answers: closed again
    assert limiter.take("k", limit).remaining == 98


def test_a_silent_redis_costs_one_timeout_not_one_per_request(limiters):
    with SilentServer() as silent:
        limiter = limiters(silent.url(rate_limit_timeout=0.1))
        limit = parse_rate_limit("1/second")
        started = time.monotonic()
        for _ in range(50):
            assert limiter.take("k", limit).allowed is True
        assert time.monotonic() - started < 0.5


def test_a_silent_redis_fails_writes_within_the_socket_timeout():
    with SilentServer() as silent:
        store = open_store(silent.url(socket_timeout=0.3))
        for call in (lambda: store.register(rec()), store.version):
            started = time.monotonic()
            with pytest.raises(StoreError, match="[Tt]imeout"):
                call()
            assert time.monotonic() - started < 1.0  # one bound, no retries
        stop = threading.Event()
        started = time.monotonic()
        store.wait_for_change(0.2, stop)
        assert time.monotonic() - started < 1.0
        store.close()


# -- a gateway on the Redis store, in-process ----------------------------------------------------


def test_two_gateways_in_process_share_registry_and_limit(space, tmp_path):
    env = {"GATEWAY_STORE": space.url, "GATEWAY_WORKERS": "1", "GATEWAY_JWT_SECRET": SECRET,
           "GATEWAY_RATE_LIMIT": "3/minute", "GATEWAY_DATA_DIR": str(tmp_path)}
    apps = [create_app(env), create_app(env)]
    try:
        one, two = (app.test_client() for app in apps)
        assert one.post("/register_service", data="svc,http://127.0.0.1:9").status_code == 201
        assert two.get("/_gateway/services/svc").status_code == 200  # read back at once
        auth = {"Authorization": make_token(sub="dana")}
        statuses = []
        for n in range(6):
            response = (one, two)[n % 2].get("/svc/x", headers=auth)
            statuses.append(response.status_code)
        assert statuses.count(429) == 3 and statuses[3:] == [429] * 3
    finally:
        for app in apps:
            app.extensions["gateway"].close()


def test_a_registry_of_the_older_layout_is_upgraded_and_its_writes_are_not_missed(stores, space):
    old = space.client
    p = space.prefix
    # as a gateway before the change history left it: index, instance hashes, version
    old.sadd(p + "index", "svc/i1")
    old.hset(p + "instance:svc/i1", mapping={
        "address": "http://10.0.0.1/i1", "weight": "1", "metadata": "{}", "ttl": "",
        "registered_at": "1700000000000000", "expires_at": "", "draining": "0"})
    old.set(p + "version", "1700000000000007")
    store = stores()
    state = store.load()
    assert [r.id for r in state.instances] == ["i1"] and state.version == 1700000000000007
    assert old.smembers(p + "service:svc") == {"i1"}
    store.register(rec("i2"))
    changes = store.changes(state.version)
    assert changes.services == frozenset({"svc"})
    assert sorted(r.id for r in changes.instances) == ["i1", "i2"]
    assert store.remove_service("svc") and old.exists(p + "service:svc") == 0
    # an older gateway writes (a version without a note), then a newer one: the gap shows
    since = store.version()
    old.incr(p + "version")
    old.sadd(p + "index", "other/o1")
    store.register(rec("i3"))
    assert store.changes(since) is None  # cannot say: the caller loads everything


def test_a_full_load_in_batches_is_one_version_even_with_writes_between_batches(
        stores, space, monkeypatch):
    from gateway_app.stores import redis as redis_store

    monkeypatch.setattr(redis_store, "LOAD_BATCH", 2)
    writer = stores()
    for n in range(12):
        writer.register(rec(f"i{n}", service=f"s{n % 4}", ttl=600))
    writer.put_policy("s0", {"auth": "none"})

    class Interrupted(RedisStore):
        def _index_batches(self):
            for number, batch in enumerate(super()._index_batches()):
                yield batch
                if number == 1:  # another node writes while this one reads
                    writer.remove_service("s1")
                    writer.register(rec("late", service="s2"))
                    writer.register(rec("i0", service="s0", weight=7))
                    writer.delete_policy("s0")
                    writer.put_policy("s3", {"auth": "none"})

    reader = Interrupted(space.url)
    try:
        batched = reader.load()
    finally:
        reader.close()
    at_once = writer._load_at_once()

    def key(state):
        return sorted((r.service, r.id, r.weight) for r in state.instances)

    assert batched.version == at_once.version
    assert key(batched) == key(at_once)
    assert batched.policies == at_once.policies == {"s3": {"auth": "none"}}
    assert ("s2", "late", 1) in key(batched) and not any(r.service == "s1"
                                                         for r in batched.instances)
