"""Client connections kept even across a gunicorn's workers.

**Balance.** Each worker listens on a socket of its own and the kernel places a new connection
on one of them by a hash of the client's address and port, so a client's 16 keep-alive
connections often land 11 and 5 on two workers. The worker with 11 serves each of them half as
often, and sets the latency tail. Here every worker publishes its count of open client
connections on a :class:`ConnectionBoard` shared with its siblings; a worker holding more than
its share (the total over the workers, rounded up) answers the next request with
``Connection: close``. The client reconnects, lands wherever the hash puts it, and within a few
reconnects the counts are even. Once they are, nothing is closed. (nginx's
``keepalive_requests`` and Envoy's ``max_requests_per_connection`` re-place long-lived
connections too, blindly; this closes only where there is an excess.)
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import threading
import time
from collections.abc import Iterable
from typing import Any

#: A slot no running worker holds (or whose worker takes no more connections).
FREE = -1
#: Seconds a connection closed for balance still counts in the total: its client comes back
#: when it next sends a request (at once, for a busy one).
AWAY_SECONDS = 0.1


class ConnectionBoard:
    """Each worker's count of open client connections, in memory shared by the gunicorn master
    and every worker it forks (an anonymous shared mapping, made in the master first)."""

    def __init__(self, slots: int) -> None:
        self._map = mmap.mmap(-1, slots * ctypes.sizeof(ctypes.c_int64))
        #: Per slot: the count, or :data:`FREE`. Aligned 8-byte stores: a reader in another
        #: process sees the old count or the new one, never a mix.
        self.counts = (ctypes.c_int64 * slots).from_buffer(self._map)
        for slot in range(slots):
            self.counts[slot] = FREE

    def free_slot(self, taken: Iterable[int | None]) -> int | None:
        """The first slot not in ``taken`` (the slots of running workers); ``None`` when all
        are: that worker then runs without balancing, neither counted nor shedding."""
        used = set(taken)
        return next((slot for slot in range(len(self.counts)) if slot not in used), None)

    def share(self) -> int:
        """What each counted worker would hold were the connections even: their total over the
        counted workers, rounded up."""
        total = workers = 0
        for count in self.counts:
            if count >= 0:
                total += count
                workers += 1
        return -(-total // workers) if workers else 0


class ConnectionBalancing:
    """For a gunicorn thread worker (mixed in before it): keep this worker's count of client
    connections on the board and close a connection (after its response) while it holds more
    than its share.

    Two counts keep it from closing more than the excess:

    - A connection told to close no longer counts in what this worker holds, at once: a
      worker's threads decide for several requests at the same moment, and each would
      otherwise see the same excess and close a connection for it (seen: 1,500 reconnects in
      10 s as two workers shed back and forth).
    - Once closed, it still counts in the total for :data:`AWAY_SECONDS`: its client comes
      back, to one worker or another, when it next sends a request. Without that, the total
      shrank with every close, and so did the share: 11 of 12 connections closed where 6 were
      the excess.
    """

    #: The board and this worker's slot on it, given by gunicorn.conf.py's pre_fork hook.
    #: Without them the worker balances nothing.


    gateway_board: ConnectionBoard | None = None
    gateway_slot: int | None = None
    #: The thread worker's own (gthread's ThreadWorker).
    nr_conns: int
    alive: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        #: Connections told to close whose close has not happened yet.
        self._leaving = 0
        self._leaving_lock = threading.Lock()
        #: When each connection told to close was closed, for the last AWAY_SECONDS (this
        #: worker's main thread alone touches it).
        self._away: collections.deque[float] = collections.deque()

    def _publish(self) -> None:
        """Put this worker's count on the board (from the main thread: the one that changes
        ``nr_conns``); a stopping worker takes no new connections, and drops out."""
        if self.gateway_board is None or self.gateway_slot is None:
            return
        away = self._away
        if away:
            gone = time.monotonic() - AWAY_SECONDS
            while away and away[0] < gone:
                away.popleft()
        self.gateway_board.counts[self.gateway_slot] = (
            self.nr_conns + len(away) if self.alive else FREE)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # Every change to nr_conns happens on this thread, in the callbacks run here or just
        # before (timeouts of idle connections): publish around them, so an idle worker's
        # count is right too.
        self._publish()
        super().wait_for_and_dispatch_events(timeout)  # type: ignore[misc]
        self._publish()

    def handle_request(self, req: Any, conn: Any) -> Any:
        """Tell the client to close this connection after the response while this worker holds
        more than its share (on the request's thread, before the response starts)."""
        board = self.gateway_board
        if board is not None and self.gateway_slot is not None and self.alive \
                and self.nr_conns - self._leaving > board.share():
            with self._leaving_lock:  # again, alone: another thread may just have shed
                if self.nr_conns - self._leaving > board.share() and not req.should_close():
                    # (a request that closes its connection anyway is no help)
                    self._leaving += 1
                    conn.gateway_leaving = True
                    req.force_close()
        return super().handle_request(req, conn)  # type: ignore[misc]

    def finish_request(self, conn: Any, fs: Any) -> None:
        try:
            super().finish_request(conn, fs)  # type: ignore[misc]  # closes one told to
        finally:
            if getattr(conn, "gateway_leaving", False):
                conn.gateway_leaving = False
                self._away.append(time.monotonic())
                with self._leaving_lock:
                    self._leaving -= 1
