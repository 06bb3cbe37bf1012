"""Workers and their registry at start and at stop, over real gunicorn and a real SQLite file:
a worker never serves from an empty registry because its store was busy, says when it is not
ready, and says so first when it stops."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import threading
import time

import requests

from tests.support import READY_TIMEOUT, wait_for

#: SQLite's PENDING lock byte: whoever holds it keeps new readers out (a writer about to take
#: its exclusive lock holds it), so a worker cannot load the registry while it is held.
PENDING_BYTE = 0x40000000


def statuses(gateway, path, auth, seconds):
    """Status and error code of requests on new connections (so they spread over the
    workers) for ``seconds``."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = gateway.fresh_get(path, auth, timeout=15)
        error = response.json().get("error") if response.status_code != 200 else None
        seen.append((response.status_code, error))
        time.sleep(0.02)
    return seen


def replace_a_worker(gateway) -> int:
    """``kill -9`` one worker; the master starts another. The new one's pid."""
    old = set(gateway.worker_pids())
    os.kill(min(old), signal.SIGKILL)
    return wait_for(lambda: set(gateway.worker_pids()) - old, READY_TIMEOUT, 0.02,
                    "a new worker").pop()


def test_the_master_makes_the_schema_and_a_worker_restarting_during_a_write_loads_at_once(
        start_gateway, upstream, auth, tmp_path):
    gateway = start_gateway(GATEWAY_WORKERS=2)
    db = tmp_path / "data" / "registry.db"
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert gateway.register("svc", upstream.address).status_code == 201
    gateway.wait_routable("/svc/", auth)

    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a long write
    try:
        replace_a_worker(gateway)
        seen = statuses(gateway, "/svc/", auth, 7)  # longer than SQLite's busy timeout
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert set(seen) == {(200, None)}, seen
    assert "empty registry" not in gateway.log()


def test_a_worker_that_cannot_load_is_not_ready_and_answers_503_never_404(
        start_gateway, upstream, auth, tmp_path):
    gateway = start_gateway(GATEWAY_WORKERS=2)
    assert gateway.register("svc", upstream.address).status_code == 201
    gateway.wait_routable("/svc/", auth)

    fd = os.open(tmp_path / "data" / "registry.db", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, PENDING_BYTE)  # no new reader gets in
        try:
            replace_a_worker(gateway)
            seen = statuses(gateway, "/svc/", auth, 9)
            ready = statuses(gateway, "/_gateway/ready", {}, 1)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, PENDING_BYTE)
    finally:
        os.close(fd)
    # the old worker serves its snapshot; the new one says it is not ready, never "no such
    # service"
    assert set(seen) <= {(200, None), (503, "registry_not_ready")}, seen
    assert (503, "registry_not_ready") in seen
    assert set(ready) <= {(200, None), (503, None)}
    not_ready = [r for r in (gateway.fresh_get("/_gateway/ready") for _ in range(20))
                 if r.status_code == 503]
    for response in not_ready:
        assert response.json()["status"] == "not_ready"
        assert "loaded" in response.json()["reason"]
    # the lock gone, the new worker loads by itself and every worker is ready
    wait_for(lambda: all(gateway.fresh_get("/_gateway/ready").status_code == 200
                         for _ in range(10)), READY_TIMEOUT, 0.1, "every worker to be ready")
    gateway.wait_routable("/svc/", auth, 200)


def test_ready_turns_503_first_during_a_graceful_stop(start_gateway, upstream, auth):
    gateway = start_gateway(GATEWAY_WORKERS=1, GATEWAY_THREADS=1)
    assert gateway.register("svc", upstream.address).status_code == 201
    gateway.wait_routable("/svc/", auth)
    assert requests.get(gateway.url + "/_gateway/ready", timeout=5).json() == {
        "status": "ready"}
    answers: dict = {}
    upstream.seen.clear()
    slow = threading.Thread(target=lambda: answers.update(
        slow=gateway.fresh_get("/svc/slow/3", auth)))
    slow.start()
    wait_for(lambda: upstream.seen, READY_TIMEOUT, what="the slow request at the upstream")
    # the only thread is busy with it for 3 s
    queued = threading.Thread(target=lambda: answers.update(
        ready=gateway.fresh_get("/_gateway/ready")))
    queued.start()  # waits for the thread
    time.sleep(0.3)  # (the worker's loop takes the connection; nothing to see from here)
    os.kill(gateway.proc.pid, signal.SIGTERM)  # graceful: in-flight and queued ones finish
    slow.join(10)
    queued.join(10)
    assert answers["slow"].status_code == 200
    assert answers["ready"].status_code == 503
    assert answers["ready"].json() == {"status": "not_ready",
                                       "reason": "this worker is shutting down"}
