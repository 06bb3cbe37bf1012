"""The access log: one line per request through Python logging, as text or JSON.

A line is made when the response is closed, so it carries the bytes really sent and the whole
duration of a streamed response; lines reach stdout in batches, at most 0.1 s later. It never
carries a token, a secret, or the query string (where clients put API keys).
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, g

from .settings import Settings
from .timestamps import rfc3339

log = logging.getLogger("gateway.access")


class CountingIterator:
    """Wraps a streamed response body to count the bytes that reach the client; closing it
    closes the body, then runs ``on_close``."""

    __slots__ = ("_iterable", "_on_close", "sent")

    def __init__(self, iterable: Any, on_close: Callable[[], None]) -> None:
        self._iterable = iterable
        self._on_close = on_close
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._iterable:
            self.sent += len(chunk)
            yield chunk

    def close(self) -> None:
        iterable, on_close = self._iterable, self._on_close
        # Dropped here, so the iterator, its callback and the response they point at are
        # freed at once, not left in a reference cycle for the garbage collector.
        self._iterable = self._on_close = _nothing
        try:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        finally:
            on_close()


def _nothing() -> None:
    pass


class BufferedLineHandler(logging.Handler):
    """Formats each record into a buffer that one thread writes out every ``interval``
    seconds, or sooner when ``max_lines`` are waiting (nginx's ``access_log ... buffer=
    flush=``).

    A request thread only formats and appends: no write, no flush, and no wake-up of another
    thread per line, each of which costs a hand-over of the GIL under load.
    """

    def __init__(self, stream: Any, interval: float = 0.1, max_lines: int = 512) -> None:
        super().__init__()
        self._stream = stream
        self._interval = interval
        self._max_lines = max_lines
        self._lines: collections.deque[str] = collections.deque()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="access-log-writer", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        self.add(self.format(record))

    def add(self, line: str) -> None:
        """Buffer one formatted line."""
        self._lines.append(line)  # deque.append is thread-safe
        if len(self._lines) >= self._max_lines:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._write_lock:
            lines = []
            try:
                while True:
                    lines.append(self._lines.popleft())
            except IndexError:
                pass
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()


#: The handler :func:`configure` installed; while it is the logger's only handler, lines go
#: straight to it (see :func:`_write`).
_own_handler: BufferedLineHandler | None = None


def configure() -> None:
    """Send access lines to stdout, one per line, unless the application set up handlers."""
    global _own_handler
    if log.handlers:
        return
    handler = BufferedLineHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    atexit.register(handler.flush)  # a worker that exits writes what is buffered
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    _own_handler = handler


def _write(line: str) -> None:
    """One line to the access logger. To our own handler alone, it is added directly: the
    same line, without a LogRecord (with its clock reads, getpid and caller lookup) per request.
    Any other setup (handlers, filters of the application's) gets a normal record."""
    handler = _own_handler
    handlers = log.handlers
    if handler is not None and len(handlers) == 1 and handlers[0] is handler \
            and not log.filters:
        handler.add(line)
    else:
        log.info("%s", line)


def flush() -> None:
    """Write buffered lines now (a worker on its way out calls it)."""
    for handler in log.handlers:
        handler.flush()


def emit(record: dict[str, Any], log_format: str) -> None:
    """Write one access line. ``record`` holds the fields; times are turned into ms here."""
    if not log.isEnabledFor(logging.INFO):
        return
    now = time.perf_counter()
    fields = {
        "time": rfc3339(time.time()),
        "request_id": record.get("request_id"),
        "client": record.get("client"),
        "method": record.get("method"),
        "path": record.get("path"),
        "service": record.get("service"),
        "instance": record.get("instance"),
        "status": record.get("status"),
        "bytes": record.get("bytes"),
        "total_ms": round((now - record["start"]) * 1000, 2),
        "upstream_ms": (round(record["upstream_ms"], 2)
                        if record.get("upstream_ms") is not None else None),
        "trace_id": record.get("trace_id"),
    }
    if log_format == "json":
        _write(json.dumps(fields, separators=(",", ":")))
    else:
        f = fields
        upstream_ms = "-" if f["upstream_ms"] is None else f["upstream_ms"]
        _write(f'{f["time"]} {f["request_id"]} {f["client"]} "{f["method"]} {f["path"]}" '
               f'{f["service"] or "-"} {f["instance"] or "-"} {f["status"]} {f["bytes"]} '
               f'{f["total_ms"]} {upstream_ms} {f["trace_id"] or "-"}')


def _ignore(view: Any, status: int, sent: int) -> None:
    pass


def line_writer(settings: Settings, observe: Callable[[Any, int, int], None] | None = None
                ) -> Callable[[Response], Response]:
    """A function that arranges for a response's access line to be written when it closes
    (call it from an ``after_request`` hook; ``g.view`` is the request's view). ``observe``
    (the metrics') is called then too, with the view, the status and the body bytes sent."""
    configure()
    log_format = settings.log_format
    notify = observe or _ignore

    def log_when_closed(response: Response) -> Response:
        view = g.view  # the request's one view, as every step saw it
        status = response.status_code
        record = {
            "start": view.start, "request_id": view.request_id, "client": view.client,
            "method": view.method, "path": view.path,
            "service": view.service if view.policy is not None else None,
            "instance": getattr(view.instance, "id", None),
            "status": status, "upstream_ms": view.upstream_ms,
            "trace_id": view.trace_id,
        }
        if response.is_streamed:
            # A streamed body is handed to the server as it is (direct passthrough): the line
            # is written when the server closes it, with the bytes that really went out.
            def streamed_line() -> None:
                record["bytes"] = sent = counter.sent
                notify(view, status, sent)
                emit(record, log_format)

            counter = CountingIterator(response.response, streamed_line)
            response.response = counter
        else:
            # The length is known now; the callback must not refer to the response (a cycle).
            record["bytes"] = sent = response.content_length or 0

            def line() -> None:
                notify(view, status, sent)
                emit(record, log_format)

            response.call_on_close(line)
        return response

    return log_when_closed
