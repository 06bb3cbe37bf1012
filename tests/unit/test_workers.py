"""The connection board the workers keep their counts on, and the gunicorn hooks that hand out
its slots (the shedding itself is tested over HTTP in tests/integration/test_listening_http.py)."""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway_app.workers import FREE, ConnectionBoard

ROOT = Path(__file__).resolve().parents[2]


def test_a_new_board_has_every_slot_free_and_hands_out_the_first_untaken():
    board = ConnectionBoard(4)
    assert list(board.counts) == [FREE] * 4
    assert board.free_slot([]) == 0
    assert board.free_slot([0, 2]) == 1
    assert board.free_slot([0, 1, 2, 3]) is None


@pytest.mark.parametrize("others, mine, over", [
    ([6], 6, False),        # even
    ([5], 7, True),         # 12 over 2: a share of 6
    ([6], 7, False),        # 13 over 2: a share of 7 (rounded up), and 7/6 is as even as it gets
    ([0], 2, True),
    ([0], 1, False),        # one connection, nowhere better to put it
    ([4, 4], 5, False),     # 13 over 3: 5
    ([3, 3], 5, True),      # 11 over 3: 4
    ([FREE, 0], 2, True),   # a free slot is no worker
])
def test_over_share_is_more_than_the_total_over_the_workers_rounded_up(others, mine, over):
    board = ConnectionBoard(len(others) + 1)
    for slot, count in enumerate(others, start=1):
        board.counts[slot] = count
    assert board.over_share(0, mine) is over
    assert board.counts[0] == mine  # published for the others


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
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert conf["worker_class"] == "gateway_app.workers.BalancedThreadWorker"
    server = SimpleNamespace(WORKERS={})
    workers = []
    for pid in (101, 102):
        worker = SimpleNamespace()
        conf["pre_fork"](server, worker)
        server.WORKERS[pid] = worker
        workers.append(worker)
    assert [w.gateway_slot for w in workers] == [0, 1]
    board = workers[0].gateway_board
    board.counts[0], board.counts[1] = 5, 3

    del server.WORKERS[101]  # gunicorn forgets the worker, then calls child_exit
    conf["child_exit"](server, workers[0])
    assert board.counts[0] == FREE  # no longer counted in the other's share
    assert board.over_share(1, 3) is False

    replacement = SimpleNamespace()
    conf["pre_fork"](server, replacement)
    assert replacement.gateway_slot == 0
