"""The connection board the workers keep their counts on, the gunicorn hooks that hand out its
slots, and the shedding decision (end to end: tests/integration/test_listening_http.py); what
the front door decides from the bytes it has read, and its boot check (end to end:
tests/integration/test_slow_clients_http.py)."""

from __future__ import annotations

import os
import runpy
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import gunicorn
import pytest
from gunicorn.workers.gthread import ThreadWorker

from gateway_app.front_conn import CHUNKED, EARLY_BODY_BYTES, scan_body_wanted
from gateway_app.worker_balance import AWAY_SECONDS, FREE, ConnectionBoard
from gateway_app.worker_checks import unsupported_gunicorn, unsupported_settings
from gateway_app.workers import BalancedThreadWorker, FrontDoorWorker

ROOT = Path(__file__).resolve().parents[2]


def test_a_new_board_has_every_slot_free_and_hands_out_the_first_untaken():
    board = ConnectionBoard(4)
    assert list(board.counts) == [FREE] * 4
    assert board.free_slot([]) == 0
    assert board.free_slot([0, 2]) == 1
    assert board.free_slot([0, 1, 2, 3]) is None


@pytest.mark.parametrize("counts, share", [
    ([6, 6], 6),
    ([7, 5], 6),
    ([7, 6], 7),        # rounded up: 7 and 6 is as even as 13 gets
    ([1, 0], 1),
    ([5, 4, 4], 5),
    ([FREE, 9, 0], 5),  # a free slot is no worker
    ([FREE, FREE], 0),
])
def test_a_share_is_the_total_over_the_workers_rounded_up(counts, share):
    board = ConnectionBoard(len(counts))
    for slot, count in enumerate(counts):
        board.counts[slot] = count
    assert board.share() == share


def test_the_board_is_shared_with_processes_forked_after_it():
    board = ConnectionBoard(2)
    pid = os.fork()
    if pid == 0:  # the child: a worker publishing its count
        board.counts[1] = 7
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.counts[1] == 7


def test_gunicorn_hooks_give_each_worker_a_slot_and_free_it_when_it_exits(monkeypatch, tmp_path):
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    monkeypatch.setenv("GATEWAY_CPU_AFFINITY", "off")
    # (the file makes a metrics directory and sets these for the workers: undone after)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.setenv("_GATEWAY_METRICS_PID", "")
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert conf["worker_class"] == "gateway_app.workers.BalancedThreadWorker"
    warnings: list[str] = []
    server = SimpleNamespace(WORKERS={}, log=SimpleNamespace(warning=warnings.append))
    workers = []
    for pid in (101, 102):
        worker = SimpleNamespace()
        conf["pre_fork"](server, worker)
        server.WORKERS[pid] = worker
        workers.append(worker)
    assert [w.gateway_slot for w in workers] == [0, 1]
    board = workers[0].gateway_board
    board.counts[0], board.counts[1] = 9, 3

    del server.WORKERS[101]  # gunicorn forgets the worker, then calls child_exit
    conf["child_exit"](server, workers[0])
    assert board.counts[0] == FREE  # no longer counted in the other's share
    assert board.share() == 3

    replacement = SimpleNamespace()
    board.counts[0] = 4  # left by a worker gunicorn forgot without child_exit (gone already)
    conf["pre_fork"](server, replacement)
    assert replacement.gateway_slot == 0
    assert board.counts[0] == FREE  # until the replacement publishes its own
    server.WORKERS[103] = replacement

    for pid in range(104, 109):  # TTIN up to the board's 6 slots, and one more
        worker = SimpleNamespace()
        conf["pre_fork"](server, worker)
        server.WORKERS[pid] = worker
    assert worker.gateway_slot is None and "without connection balancing" in warnings[0]
    conf["on_exit"](server)
    assert not os.path.exists(conf["_METRICS_DIR"])


class Request:
    def __init__(self, closing: bool = False) -> None:
        self.closing = closing

    def should_close(self) -> bool:
        return self.closing

    def force_close(self) -> None:
        self.closing = True


class Conn:
    pass


@pytest.fixture
def worker(monkeypatch):
    """A BalancedThreadWorker holding 11 connections while its sibling holds 5 (16 over 2: a
    share of 8), with gthread's own request handling and close stubbed (a connection told to
    close is closed in finish_request)."""
    monkeypatch.setattr(ThreadWorker, "handle_request", lambda self, req, conn: not req.closing)

    def finish_request(self, conn, fs):
        if not fs:
            self.nr_conns -= 1
    monkeypatch.setattr(ThreadWorker, "finish_request", finish_request)
    worker = object.__new__(BalancedThreadWorker)
    worker._leaving, worker._leaving_lock, worker._away = 0, threading.Lock(), deque()
    worker.alive, worker.nr_conns = True, 11
    worker.gateway_board, worker.gateway_slot = ConnectionBoard(2), 0
    worker.gateway_board.counts[1] = 5
    worker._publish()  # as its main loop does
    return worker


def test_requests_deciding_at_once_close_only_the_excess(worker):
    """Eight requests on eight connections, all deciding before any close happens: 3 are told
    to close, not all 8 that saw 11."""
    conns, requests = [Conn() for _ in range(8)], [Request() for _ in range(8)]
    results = [worker.handle_request(req, conn) for req, conn in zip(requests, conns, strict=True)]
    assert sum(req.closing for req in requests) == 3
    for conn, keep in zip(conns, results, strict=True):
        worker.finish_request(conn, keep)
    worker._publish()
    assert (worker.nr_conns, worker._leaving) == (8, 0)
    assert worker.gateway_board.counts[0] == 11  # the 3 count until their clients are back
    worker.gateway_board.counts[1] = 8  # the three reconnected, and landed on the sibling
    again = Request()
    worker.handle_request(again, Conn())
    assert not again.closing


def test_connections_closed_one_by_one_close_only_the_excess(worker):
    """Each connection closed before the next request decides, its client not back yet (it
    reconnects when it next sends): still 3, not 5 as the total shrinks with each close."""
    closed = 0
    for _ in range(8):
        req, conn = Request(), Conn()
        keep = worker.handle_request(req, conn)
        worker.finish_request(conn, keep)
        worker._publish()
        closed += req.closing
    assert closed == 3
    assert worker.gateway_board.counts[0] == 11


def test_a_closed_connection_stops_counting_once_away_long_enough(worker):
    worker.nr_conns = 8
    worker._away.extend([time.monotonic() - AWAY_SECONDS - 1, time.monotonic()])
    worker._publish()
    assert worker.gateway_board.counts[0] == 9
    assert len(worker._away) == 1


def test_a_request_that_closes_anyway_is_not_the_one_told_to(worker):
    conn = Conn()
    worker.handle_request(Request(closing=True), conn)  # e.g. the client sent Connection: close
    assert (worker._leaving, getattr(conn, "gateway_leaving", False)) == (0, False)


def test_a_stopping_worker_drops_off_the_board_and_sheds_nothing(worker, monkeypatch):
    monkeypatch.setattr(ThreadWorker, "wait_for_and_dispatch_events", lambda self, timeout: None)
    worker.alive = False
    worker.wait_for_and_dispatch_events(1.0)
    assert worker.gateway_board.counts[0] == FREE
    req = Request()
    worker.handle_request(req, Conn())
    assert not req.closing


# -- the front door: what the loop decides from the bytes it has, and the boot check --------

def test_the_installed_gunicorn_is_one_the_worker_supports():
    assert unsupported_gunicorn() is None


@pytest.mark.parametrize("version", ["23.0.0", "26.1", "28.0.0", "not a version"])
def test_another_gunicorn_version_is_refused_naming_the_range(version):
    assert f"gunicorn {version} is installed" in unsupported_gunicorn(version)
    assert "gunicorn>=27.0,<28.0" in unsupported_gunicorn(version)


def test_a_gunicorn_without_what_the_worker_relies_on_is_refused(monkeypatch):
    monkeypatch.delattr(ThreadWorker, "_cap_keepalive")
    assert "ThreadWorker._cap_keepalive" in unsupported_gunicorn()


def test_the_boot_check_stops_gunicorn_with_a_message(monkeypatch):
    monkeypatch.setattr(gunicorn, "__version__", "24.1.0")
    errors = []
    log = SimpleNamespace(error=lambda *args: errors.append(args[0] % args[1:]),
                          warning=lambda *args: None)
    cfg = SimpleNamespace(worker_connections=1000, threads=16, keepalive=5, is_ssl=False)
    with pytest.raises(SystemExit):
        BalancedThreadWorker.check_config(cfg, log)
    assert "gunicorn 24.1.0 is installed" in errors[0]


@pytest.mark.parametrize("settings, problem", [
    ({"is_ssl": True}, "TLS"),
    ({"protocol": "uwsgi"}, "uwsgi"),
    ({"http2_cleartext": "prior-knowledge"}, "HTTP/2"),
    ({}, None),
])
def test_settings_the_worker_does_not_serve_are_refused(settings, problem):
    cfg = SimpleNamespace(**{"is_ssl": False, "protocol": "http", "http2_cleartext": "off",
                             **settings})
    found = unsupported_settings(cfg)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize("head, wanted", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0),
    (b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n", 12),
    (b"POST / HTTP/1.1\r\ncontent-length:  700000\r\n\r\n", EARLY_BODY_BYTES),
    (b"POST / HTTP/1.1\r\nContent-Length: 12\r\nContent-Length: 12\r\n\r\n", 0),  # gunicorn: 400
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 0),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", CHUNKED),
    (b"POST / HTTP/1.1\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n", 0),
    (b"GET / HTTP/1.1\r\nX-Content-Length: 12\r\n\r\n", 0),
])
def test_the_loop_reads_the_body_a_head_announces_up_to_a_bound(head, wanted):
    assert scan_body_wanted(head) == wanted


@pytest.mark.parametrize("body, ready", [
    (b"", False),
    (b"5\r\nhello\r\n", False),
    (b"5\r\nhello\r\n0\r\n", False),
    (b"5\r\nhello\r\n0\r\n\r\n", True),
    (b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n", False),
    (b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n", True),
    (b"zz\r\n", True),  # not a chunk: gunicorn's parser says so, at once
])
def test_a_chunked_body_is_in_once_its_last_chunk_is(body, ready):
    worker = object.__new__(FrontDoorWorker)
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    conn = SimpleNamespace(buf=bytearray(head), head_end=len(head), next_chunk=len(head),
                           body_wanted=CHUNKED)
    for byte in range(len(body)):  # as it comes, a byte at a time
        conn.buf += body[byte:byte + 1]
        if worker._body_in(conn):
            break
    assert worker._body_in(conn) is ready
