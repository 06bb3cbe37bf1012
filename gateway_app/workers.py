"""gunicorn's threaded worker, made fit to be the front door, keeping client connections even
across the workers.

**The front door.** gunicorn's gthread worker hands a connection to a thread as soon as it is
accepted (or, kept alive, as soon as it is readable), and the thread then reads the request
head blocking: a client sending its head a byte a second, or sending nothing at all, holds a
thread, and 32 of them stop a worker of 16 threads. nginx, in front of every gunicorn, does not
let that happen; here the gateway is the front door, so :class:`FrontDoorWorker` does what nginx
would:

- The worker's event loop (its main thread) reads each request head without blocking, into the
  connection's buffer, within ``GATEWAY_CLIENT_HEADER_TIMEOUT``; a small request body (up to
  :data:`EARLY_BODY_BYTES`) too, within ``GATEWAY_CLIENT_BODY_TIMEOUT`` between reads. Only
  then does a thread take the request, and gunicorn's own parser reads it from those bytes.
  A head over gunicorn's limits (``limit_request_line``, ``limit_request_fields`` and
  ``limit_request_field_size``) is answered by gunicorn's own 414 or 431 at once.
- While a thread reads the rest of a body, the client's socket has the body timeout: a client
  silent for that long makes the read raise :class:`TimeoutError` out of ``wsgi.input``. It
  bounds each write of the response to the client as well (nginx's ``send_timeout``).
- An idle kept-alive connection waits in the loop, as in gthread, and costs no thread.
- Past ``worker_connections`` (``GATEWAY_MAX_CONNECTIONS``) the oldest idle connections are
  closed first: those being closed, then those waiting for a request (kept alive, or still
  sending a head), then those sending an early body. A worker stops accepting only when every
  connection it holds is in a thread or queued for one.
- A connection closed after its response lingers (its write side shut, what the client still
  sends read and thrown away, so the response is not cut by a reset) in the loop, for
  :data:`LINGER_SECONDS` at most; gthread lingered blocking, on the loop's own thread.

This reaches into gthread's internals (its ``TConn``, the callbacks its loop runs, how it
re-queues a kept-alive connection), so it is ours, for the gunicorn versions in
:data:`~gateway_app.worker_checks.GUNICORN_VERSIONS` (setup.cfg says the same), and checked at
boot: on any other version, or if what it relies on is missing, or with settings it does not
serve (TLS, uWSGI, HTTP/2 by prior knowledge), gunicorn stops with a message saying so.

**Balance** across the workers is :mod:`~gateway_app.worker_balance`'s.

Used as ``worker_class = "gateway_app.workers.BalancedThreadWorker"``, with the board and a slot
on it given to each worker by the ``pre_fork`` hook in gunicorn.conf.py (and freed by
``child_exit``), which also gives it the client timeouts. Without them it balances nothing and
uses the default timeouts.
"""

from __future__ import annotations

import collections
import errno
import io
import selectors
import socket
import sys
import threading
import time
from functools import partial
from typing import Any

from gunicorn import http, util
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers import gthread
from gunicorn.workers.base import Worker
from gunicorn.workers.gthread import ThreadWorker

from .front import CapturedErrorPage
from .front_conn import (
    BODY,
    BUSY,
    CHUNKED,
    CLOSED,
    EARLY_BODY_BYTES,
    HEAD,
    KEPT_ALIVE,
    LINGER,
    LINGER_MAX_BYTES,
    LINGER_SECONDS,
    MAX_REQUEST_LINE,
    FrontDoorConn,
    body_timeout_page,
    receive_nowait,
    scan_body_wanted,
)
from .settings import DEFAULT_CLIENT_BODY_TIMEOUT, DEFAULT_CLIENT_HEADER_TIMEOUT
from .worker_balance import ConnectionBalancing
from .worker_checks import unsupported_gunicorn, unsupported_settings


class FrontDoorWorker(ThreadWorker):
    """gunicorn's gthread worker whose loop reads request heads (and small bodies) itself,
    with deadlines, caps its connections, and closes them without blocking (see the module's
    docstring)."""

    #: Given by gunicorn.conf.py's pre_fork hook (GATEWAY_CLIENT_HEADER_TIMEOUT and _BODY_).
    gateway_header_timeout: float = DEFAULT_CLIENT_HEADER_TIMEOUT
    gateway_body_timeout: float = DEFAULT_CLIENT_BODY_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The cap (gunicorn's worker_connections); gthread's own stop at it is replaced by
        #: closing idle connections (see :meth:`_can_accept`).
        self.max_connections = self.worker_connections
        # Connections waiting in the loop, each table in the order its deadlines fall:
        #: for a request head (new, or a kept-alive one that started sending), ...
        self._heads: collections.OrderedDict[FrontDoorConn, None] = collections.OrderedDict()
        #: ... for the early part of a body (deadline: the last read and the body timeout), ...
        self._bodies: collections.OrderedDict[FrontDoorConn, None] = collections.OrderedDict()
        #: ... and for their client to close, after the last response.
        self._lingering: collections.OrderedDict[FrontDoorConn, None] = collections.OrderedDict()
        self._loop_thread: int | None = None
        self._names: dict[Any, Any] = {}  # listener -> its address
        cfg = self.cfg
        line = cfg.limit_request_line
        self._line_limit = line if 0 < line < MAX_REQUEST_LINE else (
            MAX_REQUEST_LINE if line != 0 else 1024 * 1024)
        fields = cfg.limit_request_fields if 0 < cfg.limit_request_fields <= 32768 else 32768
        field = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else 8190
        #: The longest head gunicorn's parser reads before refusing it (http/message.py).
        self._max_head = self._line_limit + 4 + fields * (field + 2) + 4

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """At boot, in the master: stop, saying why, rather than run on a gunicorn or with
        settings this worker was not made for."""
        super().check_config(cfg, log)
        problem = unsupported_gunicorn() or unsupported_settings(cfg)
        if problem:
            log.error("gateway worker: %s", problem)
            sys.exit(3)  # gunicorn's "worker failed to boot"

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """gthread's loop (27.0), with the deadlines of the connections waiting in it, and a
        cap on connections that closes idle ones rather than stop accepting."""
        self._loop_thread = threading.get_ident()
        self.poller.register(self.method_queue.fileno(), selectors.EVENT_READ,
                             self.method_queue.run_callbacks)
        self.set_accept_enabled(True)
        while self.alive:
            self.notify()
            can_accept = self._can_accept()
            if can_accept != self._accepting:
                self.set_accept_enabled(can_accept)
            self.wait_for_and_dispatch_events(timeout=1.0)
            if not self.is_parent_alive():
                break
            self.murder_keepalived()
            self._expire(time.monotonic())

        # Stopping: accept no more; what waits in the loop has a little while to become a
        # request (answered with "Connection: close"), and requests under way finish.
        self.set_accept_enabled(False)
        stop = time.monotonic() + gthread.STOP_KEEPALIVE_LINGER
        self._cap_keepalive(stop)
        for table in (self._heads, self._bodies):
            for conn in table:
                conn.deadline = min(conn.deadline, stop)
        graceful_timeout = time.monotonic() + self.cfg.graceful_timeout
        while self.nr_conns > 0 and time.monotonic() < graceful_timeout:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=0.2)
            self.murder_keepalived()
            self._expire(time.monotonic())

        self.murder_keepalived(force=True)
        self._expire(float("inf"))
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    def _can_accept(self) -> bool:
        """Below the cap, or with an idle connection to close for a new one."""
        return (self.nr_conns + len(self._lingering) < self.max_connections
                or bool(self._lingering or self.keepalived_conns or self._heads
                        or self._bodies))

    def accept(self, listener: Any) -> None:
        """A new connection waits in the loop for its request head, from now on."""
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        name = self._names.get(listener)
        if name is None:
            name = self._names[listener] = listener.getsockname()
        self.nr_conns += 1
        conn = FrontDoorConn(self, sock, client, name)
        conn.since = now = time.monotonic()
        conn.deadline = now + self.gateway_header_timeout
        self._heads[conn] = None
        self._wait(conn)
        self._make_room()

    def enqueue_req(self, conn: Any) -> None:
        """gthread's re-queue of a kept-alive connection whose next request it read ahead of
        (draining a body): that request waits in the loop too, unless its head is in."""
        unreader = conn.parser.unreader
        conn.buf[:0] = unreader.buf.getvalue()
        unreader.buf = io.BytesIO()
        conn.sock.setblocking(False)
        conn.since = now = time.monotonic()
        conn.phase, conn.deadline = HEAD, now + self.gateway_header_timeout
        self._heads[conn] = None
        if self._advance(conn):
            self._wait(conn)

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """The loop's one callback for a connection waiting in it (gthread registers kept-alive
        connections with it too)."""
        phase = conn.phase
        if phase == LINGER:
            self._drain(conn)
            return
        if phase in (BUSY, CLOSED):  # an event from before this batch's callbacks closed it
            return
        data = receive_nowait(conn)
        if data is None:
            return
        if not data:  # the client closed (or reset) its side
            if phase == BODY:
                # A whole head, then a body cut short: a thread answers it (400, saying why;
                # a half-closed client still reads it), and no upstream hears of it.
                del self._bodies[conn]
                self._dispatch(conn)
                return
            self._drop(conn)
            return
        now = time.monotonic()
        if phase == KEPT_ALIVE:
            self.keepalived_conns.remove(conn)
            conn.phase, conn.since = HEAD, now
            conn.deadline = now + self.gateway_header_timeout
            self._heads[conn] = None
        elif phase == BODY:
            conn.deadline = now + self.gateway_body_timeout
            self._bodies.move_to_end(conn)
        conn.buf += data
        self._advance(conn)

    def _advance(self, conn: FrontDoorConn) -> bool:
        """Move ``conn`` on with what it has sent: to a thread when its request is ready.
        ``True`` while it must wait for more."""
        buf = conn.buf
        if conn.phase == HEAD:
            end = buf.find(b"\r\n\r\n", max(conn.scanned - 3, 0))
            if end < 0:
                refuse = self._head_problem(conn)
                conn.scanned = len(buf)
                if refuse is None:
                    return True
                del self._heads[conn]
                if isinstance(refuse, Exception):
                    conn.refusal = refuse
                self._dispatch(conn)
                return False
            del self._heads[conn]
            conn.head_end = conn.next_chunk = end + 4
            conn.body_wanted = scan_body_wanted(bytes(buf[:end + 4]))
            if not conn.body_wanted or self._body_in(conn):
                self._dispatch(conn)
                return False
            conn.phase = BODY
            conn.deadline = time.monotonic() + self.gateway_body_timeout
            self._bodies[conn] = None
            return True
        if conn.phase == BODY and self._body_in(conn):
            del self._bodies[conn]
            self._dispatch(conn)
            return False
        return True

    def _head_problem(self, conn: FrontDoorConn) -> Exception | bool | None:
        """For an incomplete head: the error gunicorn would refuse it with (too long a request
        line, too large a head), ``True`` when gunicorn's parser refuses it at once anyway (a
        bare LF: every line must end in CRLF), ``None`` when it may still become a request."""
        buf = conn.buf
        start = 2 if buf[:2] == b"\r\n" else 0
        eol = buf.find(b"\r\n", start)
        size = (eol if eol >= 0 else len(buf)) - start
        if size > self._line_limit + (0 if eol >= 0 else 2):
            return LimitRequestLine(size, self._line_limit)
        if len(buf) > self._max_head:
            return LimitRequestHeaders("max buffer headers")
        at = buf.find(b"\n", conn.scanned)
        while at >= 0:
            if at == 0 or buf[at - 1] != 13:  # "\r"
                return True
            at = buf.find(b"\n", at + 1)
        return None

    def _body_in(self, conn: FrontDoorConn) -> bool:
        """Whether enough of the body is in for a thread to take the request."""
        buf, have = conn.buf, len(conn.buf) - conn.head_end
        if conn.body_wanted != CHUNKED:
            return have >= conn.body_wanted
        if have >= EARLY_BODY_BYTES:
            return True
        at = conn.next_chunk  # walk the chunks not walked yet, up to the last one
        while True:
            eol = buf.find(b"\r\n", at)
            if eol < 0:
                return len(buf) - at > 1024  # no size line is that long: gunicorn will say
            try:
                size = int(bytes(buf[at:eol]).split(b";", 1)[0], 16)
            except ValueError:
                return True  # not a chunk: gunicorn's parser refuses it
            if size == 0:  # the last chunk, then trailer lines up to an empty one
                return buf[eol + 2:eol + 4] == b"\r\n" or buf.find(b"\r\n\r\n", eol) >= 0
            if eol + 4 + size > len(buf):
                return False
            at = conn.next_chunk = eol + 4 + size

    def _dispatch(self, conn: FrontDoorConn) -> None:
        """Hand the request to a thread, its bytes to gunicorn's parser."""
        if conn.registered:
            self.poller.unregister(conn.sock)
            conn.registered = False
        conn.phase = BUSY
        if conn.refusal is None:
            if conn.parser is None:
                conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.parser.unreader.unread(bytes(conn.buf))
        conn.buf = bytearray()
        conn.scanned = 0
        ThreadWorker.enqueue_req(self, conn)

    def _wait(self, conn: FrontDoorConn) -> None:
        if not conn.registered:
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_client_socket_readable, conn))
            conn.registered = True

    def _drop(self, conn: FrontDoorConn) -> None:
        """Close a connection waiting in the loop, at once (no response is under way)."""
        phase = conn.phase
        if phase == LINGER:
            del self._lingering[conn]
        else:
            if phase == KEPT_ALIVE:
                self.keepalived_conns.remove(conn)
            elif phase == HEAD:
                del self._heads[conn]
            elif phase == BODY:
                del self._bodies[conn]
            self.nr_conns -= 1
        if conn.registered:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        conn.registered = False
        conn.phase = CLOSED
        util.close(conn.sock)

    def _expire(self, now: float) -> None:
        """Close the connections whose time in the loop is up: no head in time (nginx closes
        them too, without an answer), no more body in time (answered 408 first, as nginx
        does), or lingering long enough."""
        for table in (self._heads, self._bodies, self._lingering):
            while table:
                conn = next(iter(table))
                if conn.deadline > now:
                    break
                if table is self._bodies:
                    try:  # one non-blocking send: a small page fits the socket's buffer
                        conn.sock.send(body_timeout_page())
                    except OSError:
                        pass
                self._drop(conn)

    def _make_room(self) -> None:
        """Close the oldest idle connections while over the cap: lingering ones, then those
        waiting for a request (kept alive, or sending a head), then those sending a body."""
        while self.nr_conns + len(self._lingering) > self.max_connections:
            victim: FrontDoorConn | None
            if self._lingering:
                victim = next(iter(self._lingering))
            else:
                kept = self.keepalived_conns[0] if self.keepalived_conns else None
                head = next(iter(self._heads)) if self._heads else None
                victim = (kept if head is None or (kept is not None and kept.since <= head.since)
                          else head)
                if victim is None:
                    if not self._bodies:
                        return
                    victim = next(iter(self._bodies))
            self.log.debug("Closing an idle connection from %s: over %d connections",
                           victim.client, self.max_connections)
            self._drop(victim)

    # -- lingering close -----------------------------------------------------------------------

    def linger(self, conn: FrontDoorConn) -> None:
        """Close ``conn`` after its response (RFC 9112 section 9.6), in the loop: shut its
        write side, then read and throw away what the client still sends until it closes, for
        LINGER_SECONDS at most. (gunicorn's close_graceful does this blocking.)"""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            util.close(conn.sock)
            return
        conn.phase, conn.drained = LINGER, 0
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self._lingering[conn] = None
        self._wait(conn)
        self._make_room()

    def _drain(self, conn: FrontDoorConn) -> None:
        data = receive_nowait(conn)
        if data is None:
            return
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_MAX_BYTES:
            self._drop(conn)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's answer to a request it could not parse (400, 414, 431, 501...), logged
        as gunicorn does, but in the gateway's JSON error shape instead of an HTML page."""
        page = CapturedErrorPage()
        super().handle_error(req, page, addr, exc)
        try:
            util.write_nonblock(client, page.json())
        except Exception:  # the client is gone; as gunicorn does, say so at debug level
            self.log.debug("Failed to send error message.")

    def handle_quit(self, sig: int, frame: Any) -> None:
        """A quick stop (SIGQUIT, SIGINT), without gthread's shutdown of the thread pool first.

        gthread's handle_quit calls ``ThreadPoolExecutor.shutdown()`` from the signal handler.
        That takes the pool's ``_shutdown_lock``, which ``submit()`` holds while it queues a
        request; a signal landing on the main thread inside ``submit()`` (it runs there, from
        the loop) leaves the handler waiting on a lock its own thread holds, until the master
        kills the worker (seen in the tests: every other quick stop right after clients reset
        their connections). The deadlock is CPython's
        https://github.com/python/cpython/issues/121649 ("Deadlock when shutting down
        ThreadPoolExecutor from inside OS Signal handler"), met through gthread's handle_quit.
        The pool's threads are joined at exit all the same."""
        Worker.handle_quit(self, sig, frame)


class BalancedThreadWorker(ConnectionBalancing, FrontDoorWorker):
    """The front-door worker, keeping client connections even across the workers (see
    :mod:`~gateway_app.worker_balance`)."""
