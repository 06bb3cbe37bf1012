"""Health, one view: the boards (local, SQLite, Redis) and trackers sharing one board, as the
workers of a gateway (or the nodes of a cluster) do."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from gateway_app.health import EJECT_AFTER, HealthTracker, describe
from gateway_app.stores.healthboard import (
    EVENTS_KEPT,
    MAX_CAUSE,
    WORKER_STALE,
    LocalBoard,
    SQLiteBoard,
    health_path,
    prepare,
)

CHECK = {"path": "/healthz", "interval": 1.0, "timeout": 0.5, "healthy_threshold": 2,
         "unhealthy_threshold": 2}


@pytest.fixture(params=["local", "sqlite", "redis"])
def open_board(request, tmp_path):
    """Opens boards of one kind on the same place: each is one worker's (or node's)."""
    opened = []
    space = request.getfixturevalue("space") if request.param == "redis" else None

    def open_one():
        if request.param == "local":
            board = opened[0] if opened else LocalBoard()  # one process: one board
        elif request.param == "sqlite":
            board = SQLiteBoard(health_path(tmp_path / "registry.db"))
        else:
            from gateway_app.stores.redis import parse_url
            from gateway_app.stores.redis_health import RedisBoard

            board = RedisBoard(parse_url(space.url))
        opened.append(board)
        return board

    open_one.kind = request.param
    yield open_one
    for board in opened:
        board.close()


def bump(key, value):
    return lambda state: ({**state, "n": state.get("n", 0) + 1, "updated": value},
                          {"time": value, "cause": f"n+1 at {value}", "value": value}, "done")


def test_updates_are_seen_by_every_board_and_read_incrementally(open_board):
    one, two = open_board(), open_board()
    start = two.version()
    assert one.update("svc/a", bump("svc/a", 1.0)) == ("done", {"n": 1, "updated": 1.0})
    one.update("svc/b", bump("svc/b", 2.0))
    version, states = two.changed(start)
    assert version > start and states == {"svc/a": {"n": 1, "updated": 1.0},
                                          "svc/b": {"n": 1, "updated": 2.0}}
    two.update("svc/a", bump("svc/a", 3.0))
    later, states = one.changed(version)
    assert later > version and states == {"svc/a": {"n": 2, "updated": 3.0}}
    assert one.changed(later) == (later, {})
    assert two.states(["svc/a", "svc/zzz"]) == {"svc/a": {"n": 2, "updated": 3.0}}
    # a change that changes nothing leaves the version alone
    assert two.update("svc/a", lambda s: (None, None, s["n"])) == (2, {"n": 2, "updated": 3.0})
    assert one.version() == later


def test_timeline_is_bounded_and_newest_last(open_board):
    board = open_board()
    for i in range(EVENTS_KEPT + 10):
        board.update("svc/a", bump("svc/a", float(i)))
    board.update("svc/a", lambda s: (None, {"time": 1.0, "cause": "x" * 5000,
                                            "value": "y" * 5000}, None))
    events = board.events("svc/a")
    assert len(events) == EVENTS_KEPT >= 50
    assert events[0]["value"] == 11.0 and events[-2]["value"] == EVENTS_KEPT + 9
    assert len(events[-1]["cause"]) == MAX_CAUSE and events[-1]["value"] is None
    assert open_board().events("svc/unknown") == []


def test_forget_removes_state_and_timeline_unless_updated_since(open_board):
    board = open_board()
    board.update("svc/a", bump("svc/a", 10.0))
    board.update("svc/b", bump("svc/b", 30.0))
    board.forget(["svc/a", "svc/b"], before=20.0)  # b was registered again at 30
    assert board.events("svc/a") == [] and board.states(["svc/a"]) == {}
    assert board.states(["svc/b"]) and board.events("svc/b")
    assert board.keys() == {"svc/b"}


def test_one_probe_claim_at_a_time(open_board):
    one, two = open_board(), open_board()
    now = time.time()
    assert one.claim("svc/a", now, 0.3)
    assert not two.claim("svc/a", now, 0.3)
    assert two.claim("svc/b", now, 0.3)
    assert one.claim("svc/a", now + 0.5, 0.3) or open_board.kind == "redis"
    if open_board.kind == "redis":  # Redis expires claims on its own clock
        time.sleep(0.35)
        assert two.claim("svc/a", time.time(), 0.3)


def test_in_flight_is_summed_over_workers_that_report(open_board):
    one, two = open_board(), open_board()
    now = time.time()
    one.report("n/1", {"svc/a": 2}, now)
    two.report("n/2", {"svc/a": 1, "svc/b": 4}, now)
    one.report("n/3", {"svc/a": 100}, now - WORKER_STALE - 1)  # a worker that died
    assert two.in_flight(now) == {"svc/a": 3, "svc/b": 4}


def _increment(path, times):
    board = SQLiteBoard(path)
    for _ in range(times):
        board.update("svc/a", lambda s: ({**s, "n": s.get("n", 0) + 1}, None, None))
    board.close()


def test_sqlite_updates_are_atomic_across_processes(tmp_path):
    path = health_path(tmp_path / "registry.db")
    prepare(path)  # as gunicorn's master does before forking
    assert path.name == "registry.health.db" and path.exists()
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_increment, args=(path, 50)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert SQLiteBoard(path).states(["svc/a"]) == {"svc/a": {"n": 200}}


# -- trackers sharing a board: the workers of one gateway -----------------------------------


@pytest.fixture
def workers(open_board):
    """Two trackers on one board, as two workers (or nodes)."""
    return (HealthTracker(open_board(), ejection_seconds=1.0, node="n1"),
            HealthTracker(open_board(), ejection_seconds=1.0, node="n2"))


def test_failures_count_over_workers_and_the_ejection_is_seen_by_all(workers):
    one, two = workers
    a1, a2 = one.get("svc", "a"), two.get("svc", "a")
    now = time.time()
    for i in range(EJECT_AFTER - 1):
        (one if i % 2 else two).failed(a1 if i % 2 else a2, now, "connection refused")
    assert a1.ejected_until == a2.ejected_until == 0.0
    one.failed(a1, now, "connection refused")  # the fifth in a row, over both workers
    assert a1.ejected_until == pytest.approx(now + 1.0)
    two.sync(now)
    assert a2.ejected_until == a1.ejected_until and a2.ejections == 1
    events = two.events("svc", "a")
    assert [e["cause"] for e in events] == [f"{EJECT_AFTER} consecutive failures: "
                                            "connection refused"]
    assert events[0]["node"] == "n1" and isinstance(events[0]["worker"], int)
    assert events[0]["value"] == 1.0
    view = two.view(["svc/a"], now)["svc/a"]
    assert describe(view, now, False)["state"] == "ejected"
    assert view == one.view(["svc/a"], now)["svc/a"]


def test_passive_ejection_ends_doubles_and_a_success_recovers(workers):
    one, two = workers
    a1, a2 = one.get("svc", "a"), two.get("svc", "a")
    now = time.time()
    for _ in range(EJECT_AFTER):
        one.failed(a1, now, "HTTP 503")
    later = a1.ejected_until + 0.01  # the ejection is over: it takes traffic again...
    assert describe(two.view(["svc/a"], later)["svc/a"], later, False)["state"] == "healthy"
    for _ in range(EJECT_AFTER):  # ... fails again: twice as long
        two.failed(a2, later, "HTTP 503")
    assert a2.ejected_until == pytest.approx(later + 2.0)
    after = a2.ejected_until + 0.01
    one.sync(after)
    one.succeeded(a1, after)  # it answers: the ejections in a row are forgotten
    two.sync(after)
    assert (a2.ejections, a2.consecutive_failures) == (0, 0)
    causes = [e["cause"] for e in one.events("svc", "a")]
    assert causes[-1] == "request succeeded after ejection" and len(causes) == 3
    for _ in range(EJECT_AFTER):
        one.failed(a1, after, "HTTP 503")
    assert a1.ejected_until == pytest.approx(after + 1.0)  # back to the first length


def test_success_path_writes_nothing_once_served(workers):
    one, _ = workers
    a = one.get("svc", "a")
    one.succeeded(a, time.time())  # the first answer ever: "healthy" from now on
    version = one.board.version()
    for _ in range(100):
        one.succeeded(a, time.time())
    assert one.board.version() == version


def test_active_check_failures_and_recovery_are_shared(workers):
    one, two = workers
    a1, a2 = one.get("svc", "a"), two.get("svc", "a")
    now = time.time()
    one.probed(a1, True, {"time": "t", "status": 200}, CHECK, now)  # the first pass admits
    two.sync(now)
    assert a2.check_ok
    two.probed(a2, False, {"time": "t", "status": 500}, CHECK, now + 1)
    assert a2.check_ok  # one failure is below the threshold
    one.sync(now + 1)
    one.probed(a1, False, {"time": "t", "status": 500}, CHECK, now + 2)
    two.sync(now + 2)
    assert not a2.check_ok
    view = two.view(["svc/a"], now + 2)["svc/a"]
    assert describe(view, now + 2, True)["state"] == "ejected"
    assert view["last_check"] == {"ok": False, "time": "t", "status": 500}
    one.probed(a1, False, {"time": "t", "error": "connection refused"}, CHECK, now + 3)
    one.probed(a1, True, {"time": "t", "status": 200}, CHECK, now + 4)
    assert not a1.check_ok  # healthy_threshold: two passes
    two.sync(now + 4)
    two.probed(a2, True, {"time": "t", "status": 200}, CHECK, now + 5)
    one.sync(now + 5)
    assert a1.check_ok and a2.check_ok
    causes = [e["cause"] for e in one.events("svc", "a")]
    assert causes == ["probe passed", "probe: HTTP 500", "probe passed"]


def test_a_passing_probe_lifts_a_passive_ejection(workers):
    one, two = workers
    a1, a2 = one.get("svc", "a"), two.get("svc", "a")
    now = time.time()
    one.probed(a1, True, {"time": "t", "status": 200}, CHECK, now)
    for _ in range(EJECT_AFTER):
        one.failed(a1, now, "timeout")
    assert a1.ejected_until > now
    two.sync(now)
    two.probed(a2, True, {"time": "t", "status": 200}, CHECK, now + 0.5)
    one.sync(now + 0.5)
    assert a1.ejected_until == 0.0
    assert one.events("svc", "a")[-1]["cause"] == "probe passed during ejection"


def test_forgotten_instances_lose_their_timeline(workers):
    one, two = workers
    one.record("svc", "a", "registered", "registered", "http://x")
    assert [e["cause"] for e in two.events("svc", "a")] == ["registered"]
    two.forget("svc", ["a"], before=time.time() + 1)
    assert one.events("svc", "a") == []


def test_listeners_hear_every_event_once(workers):
    one, _ = workers
    heard = []
    one.listeners.append(lambda service, instance, event: heard.append(
        (service, instance, event["kind"])))
    one.listeners.append(lambda *args: 1 / 0)  # a broken hook breaks nothing
    a = one.get("svc", "a")
    for _ in range(EJECT_AFTER):
        one.failed(a, time.time(), "HTTP 502")
    one.record("svc", "a", "drained", "drained")
    assert heard == [("svc", "a", "ejected"), ("svc", "a", "drained")]


def test_in_flight_is_reported_and_listed_by_any_worker(workers):
    one, two = workers
    a1, a2 = one.get("svc", "a"), two.get("svc", "a")
    one.started(a1)
    one.started(a1)
    two.started(a2)
    now = time.time()
    one.sync(now)
    two.sync(now)
    assert one.view(["svc/a"], now)["svc/a"]["in_flight"] == 3
    one.finished(a1)
    one.finished(a1)
    one.sync(now)
    two.finished(a2)
    two.sync(now)
    assert two.view(["svc/a"], now)["svc/a"]["in_flight"] == 0


def test_an_unreachable_board_leaves_health_per_worker_without_waiting_on_it():
    from gateway_app.stores.redis import parse_url
    from gateway_app.stores.redis_health import RedisBoard
    from tests.redis_support import SilentServer

    with SilentServer() as silent:  # a hung Redis: every call waits for its timeout
        board = RedisBoard(parse_url(silent.url(socket_timeout=0.5)))
        tracker = HealthTracker(board, ejection_seconds=1.0)
        a = tracker.get("svc", "a")
        now = time.time()
        started = time.monotonic()
        for _ in range(EJECT_AFTER):
            tracker.failed(a, now, "connection refused")
        # the first failure waits for the board; the next ones leave it alone
        assert time.monotonic() - started < 0.5 * 3
        assert a.ejected_until > now  # ejected here all the same
        assert tracker.view(["svc/a"], now)["svc/a"]["ejected_until"] == a.ejected_until
        tracker.close()


# -- the API, in process ----------------------------------------------------------------------


def test_events_endpoint_and_listing_fields(make_app):
    client = make_app().test_client()
    created = client.post("/register_service", json={"name": "svc", "address": "http://a.test:1"})
    instance_id = created.get_json()["instance"]["id"]
    assert client.put(f"/_gateway/services/svc/instances/{instance_id}/drain").status_code == 200
    answer = client.get(f"/_gateway/services/svc/instances/{instance_id}/events")
    assert answer.status_code == 200
    timeline = answer.get_json()["events"]
    assert [(e["cause"], e["kind"]) for e in timeline] == [("registered", "registered"),
                                                           ("drained", "drained")]
    assert set(timeline[0]) == {"time", "node", "worker", "cause", "value", "kind"}
    assert timeline[0]["value"] == "http://a.test:1" and timeline[0]["time"] <= time.time()
    listed = client.get("/_gateway/services/svc").get_json()["instances"][0]
    assert (listed["state"], listed["health"], listed["last_cause"]) == (
        "draining", "draining", "drained")
    assert listed["consecutive_failures"] == 0 and listed["in_flight"] == 0
    for path, error in (("/_gateway/services/nope/instances/x/events", "service_not_found"),
                        ("/_gateway/services/svc/instances/x/events", "instance_not_found")):
        missing = client.get(path)
        assert missing.status_code == 404 and missing.get_json()["error"] == error
