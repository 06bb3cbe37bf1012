"""A client connection as :class:`~gateway_app.workers.FrontDoorWorker` holds it: where it is
(its phase), the bytes of its next request read so far, and how much body to read before a
thread takes it. The worker's loop moves it between phases (see workers.py)."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

from gunicorn.workers.gthread import TConn

from .front import error_page

if TYPE_CHECKING:
    from .workers import FrontDoorWorker


def receive_nowait(conn: Any) -> bytes | None:
    """What a connection waiting in the loop sent: ``b""`` when the client closed (or reset)
    its side, ``None`` when there is nothing after all."""
    try:
        return conn.sock.recv(RECV_BYTES)  # type: ignore[no-any-return]
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def body_timeout_page() -> bytes:
    """The 408 the loop sends a client whose body stopped arriving (a new request id each)."""
    return error_page(408, "Request Timeout", "the request body stopped arriving")


#: Body bytes the loop reads before a thread takes the request (all of a smaller body).
EARLY_BODY_BYTES = 64 * 1024
#: Seconds, and bytes, a closed connection lingers at most (gunicorn's close_graceful).
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 64 * 1024
#: Bytes asked for in one non-blocking read in the loop.
RECV_BYTES = 64 * 1024
#: gunicorn's bound on a request line when its setting is out of range (http/message.py).
MAX_REQUEST_LINE = 8190
#: ``body_wanted`` of a chunked body: until its last chunk, or EARLY_BODY_BYTES.
CHUNKED = -1

# Where a connection is, for the loop.
BUSY, KEPT_ALIVE, HEAD, BODY, LINGER, CLOSED = (
    "busy", "kept-alive", "head", "body", "linger", "closed")


class FrontDoorConn(TConn):
    """A client connection as :class:`FrontDoorWorker` holds it: gthread's, with the bytes of
    its next request read so far, where it is (:data:`HEAD`, :data:`BODY`...), and until when
    it may stay there. Every field but the timeouts is the loop's alone."""

    def __init__(self, worker: FrontDoorWorker, sock: socket.socket, client: Any,
                 server: Any) -> None:
        super().__init__(worker.cfg, sock, client, server)  # (makes the socket non-blocking)
        self.worker = worker
        #: Never wait for data on a thread (gthread's own wait): the loop has read the request.
        self.data_ready = True
        self.phase = HEAD
        self.registered = False  # with the loop's poller
        self.since = self.deadline = 0.0
        #: The request read so far; ``scanned``: how much of it was searched for the head's end.
        self.buf = bytearray()
        self.scanned = 0
        #: Once the head is complete: where the body starts, how much of it to read before a
        #: thread takes the request (or CHUNKED), and where the next chunk's size line is.
        self.head_end = self.body_wanted = self.next_chunk = 0
        #: A head gunicorn must refuse (too large), raised on the thread by :meth:`init`.
        self.refusal: Exception | None = None
        self.drained = 0  # bytes thrown away while lingering

    def init(self) -> None:
        """On the request's thread, before gunicorn parses the head from the bytes read."""
        if self.refusal is not None:
            refusal, self.refusal = self.refusal, None
            raise refusal  # gunicorn's handle() answers it (414, 431)
        super().init()
        self.sock.settimeout(self.worker.gateway_body_timeout)

    def set_timeout(self) -> None:
        """gthread keeps the connection alive: it waits in the loop from now on (gthread
        registers it with the poller next)."""
        super().set_timeout()
        self.phase, self.since, self.registered = KEPT_ALIVE, time.monotonic(), True

    def close(self, graceful: bool = False) -> None:
        if graceful and self.worker.on_loop_thread():
            self.worker.linger(self)
        else:
            super().close(graceful)


def scan_body_wanted(head: bytes) -> int:
    """How much body to read in the loop before a thread takes the request, from a scan of the
    complete head. Only the timing depends on this: gunicorn's parser still reads the head and
    the body, and refuses what it must. A client waiting for ``100 Continue`` gets a thread at
    once (gunicorn sends the 100 from it)."""
    lower = head.lower()
    if b"\nexpect:" in lower:
        return 0
    if b"\ntransfer-encoding:" in lower:
        return CHUNKED
    at = lower.find(b"\ncontent-length:")
    if at < 0 or lower.count(b"\ncontent-length:") > 1:
        return 0
    value = lower[at + 16:lower.find(b"\r\n", at + 1)].strip(b" \t")
    return min(int(value), EARLY_BODY_BYTES) if value.isdigit() else 0
