"""Fast paths through private internals of http.client, urllib3 and prometheus_client: one
module, one switch.

Each fast path does exactly what the stock path of :mod:`~gateway_app.transport` does, for
less CPU, by relying on something the libraries do not promise:

========================  ==============================================  ====================
name                      what it saves                                   what it relies on
========================  ==============================================  ====================
``kernel_timeouts``       a plain upstream socket keeps its timeouts in   http.client and
                          the kernel (SO_RCVTIMEO/SO_SNDTIMEO): no        urllib3 reach the
                          ``poll`` before each receive and send, no       socket only through
                          ``ioctl`` per ``settimeout`` (four system calls ``settimeout``,
                          per request, each letting go of the GIL)        ``recv_into``,
                                                                          ``sendall`` and the
                                                                          like; Linux's
                                                                          ``struct timeval``
``header_lines``          each request header line is checked and         http.client's
                          written in one step (0.5 µs, not 1.3 µs; ten    private ``_output``;
                          a request)                                      urllib3's
                                                                          ``SKIP_HEADER``
``header_block``          the answer's header block is split without the  what
                          ``email`` package: about 45 µs of CPU a         ``HTTPResponse.begin``
                          forwarded request, about 3.4 points of the      sets (``_read_status``,
                          bench's gateway/ceiling ratio (medians of 11    ``length``,
                          alternated runs each way)                       ``chunked``,
                                                                          ``will_close``...)
========================  ==============================================  ====================

``header_block`` replaces what was http.client's ``begin`` re-created from its bytecode with
``parse_headers`` swapped in its globals: the same work, written out here, and checked at start
by reading sample answers both ways and comparing every attribute of the two responses.

``GATEWAY_FAST_PATHS=off`` turns them all off (or name the ones to keep). At start,
:func:`available` checks each requested one against the installed libraries, by what it
relies on and by a small trial against the stock path; one that fails falls back to the
stock path with one warning. tests/unit/test_fastpaths.py sends the same wire scenarios both
ways and compares the bytes; tests/unit/test_metrics.py adds the same observations to two
histograms both ways and compares the exposition.
"""

from __future__ import annotations

import bisect
import email.parser
import functools
import http.client
import io
import logging
import re
import socket
import struct
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any

from prometheus_client import Histogram
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import SKIP_HEADER

from .addresses import AddressPolicy
from .settings import FAST_PATH_NAMES
from .transport import DeadlineSocket, UpstreamHTTPConnection, UpstreamHTTPSConnection, capped
from .upstream_head import MAX_HEADERS, MAX_LINE, UpstreamHTTPResponse

log = logging.getLogger("gateway.fastpaths")

# -- kernel_timeouts -------------------------------------------------------------------------


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO/SO_SNDTIMEO; zero (the kernel's "forever") for
    ``None``, and never zero for a (tiny) timeout."""
    if seconds is None:
        return struct.pack("@ll", 0, 0)
    micros = max(1, round(seconds * 1_000_000))
    return struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)


class KernelTimedSocket(socket.socket):
    """A blocking socket whose timeouts the kernel enforces (SO_RCVTIMEO, SO_SNDTIMEO).

    A Python socket with a timeout is non-blocking underneath: every ``settimeout`` is an
    ioctl and every send or receive a ``poll`` first. Here ``settimeout`` only records the
    value; a receive or send passes it to the kernel when it differs from the one the kernel
    already holds for that direction (in practice once per connection, or once per operation
    near the exchange's deadline, which bounds it as for the stock socket). A kernel timeout
    (EAGAIN) is raised as :class:`TimeoutError`, as a Python timeout would be.
    """

    __slots__ = ("_timeout", "_in_kernel")
    _timeout: float | None
    #: The timeout the kernel holds, per option (SO_RCVTIMEO, SO_SNDTIMEO); absent: none set.
    _in_kernel: dict[int, float | None]

    @classmethod
    def adopt(cls, sock: socket.socket) -> KernelTimedSocket:
        """Take over ``sock``'s file descriptor (and its timeout)."""
        timeout = sock.gettimeout()
        timed = cls(sock.family, sock.type, sock.proto, sock.detach())
        socket.socket.settimeout(timed, None)  # the descriptor itself becomes blocking
        timed._timeout = timeout
        timed._in_kernel = {}
        return timed

    def settimeout(self, value: float | None) -> None:
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def _timed(self, option: int, method: Callable[..., Any], *args: Any) -> Any:
        """The socket ``method`` with the timeout in force for ``option``'s direction."""
        timeout = capped(self._timeout)
        if self._in_kernel.get(option, -1.0) != timeout:
            self.setsockopt(socket.SOL_SOCKET, option, _timeval(timeout))
            self._in_kernel[option] = timeout
        try:
            return method(self, *args)
        except BlockingIOError:
            raise TimeoutError("timed out") from None

    def recv_into(self, *args: Any) -> int:
        return self._timed(socket.SO_RCVTIMEO, socket.socket.recv_into, *args)

    def recv(self, *args: Any) -> bytes:
        return self._timed(socket.SO_RCVTIMEO, socket.socket.recv, *args)

    def send(self, *args: Any) -> int:
        return self._timed(socket.SO_SNDTIMEO, socket.socket.send, *args)

    def sendall(self, *args: Any) -> None:
        self._timed(socket.SO_SNDTIMEO, socket.socket.sendall, *args)


def _check_kernel_timeouts() -> str | None:
    if not hasattr(socket, "SO_RCVTIMEO") or not hasattr(socket, "SO_SNDTIMEO"):
        return "this platform has no SO_RCVTIMEO/SO_SNDTIMEO"
    if "sendall" not in http.client.HTTPConnection.send.__code__.co_names:
        return "http.client no longer sends through sock.sendall"
    if "recv_into" not in socket.SocketIO.readinto.__code__.co_names:
        return "socket files no longer read through recv_into"
    a, b = socket.socketpair()
    timed = KernelTimedSocket.adopt(a)  # (a is detached: closing timed closes the pair's end)
    try:
        timed.settimeout(0.005)
        try:
            timed.recv(1)
            return "a kernel receive timeout did not fire"
        except TimeoutError:
            pass
        timed.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(2.0))
        size = len(_timeval(2.0))
        if struct.unpack("@ll", timed.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                                 size)) != (2, 0):
            return "the kernel reads struct timeval otherwise"
    except OSError as exc:
        return f"a trial of kernel timeouts failed: {exc}"
    finally:
        timed.close()
        b.close()
    return None


# -- header_lines ----------------------------------------------------------------------------

#: http.client's checks on a header line: a legal name, and no bare CR or LF in the value
#: (which would let a value start a header of its own).
_LEGAL_HEADER_NAME = re.compile(rb"[^:\s][^:\r\n]*").fullmatch
_ILLEGAL_HEADER_VALUE = re.compile(rb"\n(?![ \t])|\r(?![ \t\n])").search


class OneStepPutheader:
    """``putheader`` for the usual call (one ``str`` value) in one step.

    urllib3's ``putheader`` looks for its ``SKIP_HEADER`` marker among the values, then
    http.client's checks and encodes each value: 1.3 µs a header, ten headers a request. This
    does http.client's encoding and checks directly (0.5 µs). Only the marker object itself
    (see :meth:`~gateway_app.forwarding.Forwarder.send`) and other calls go the usual way: a
    client's value that happens to equal the marker is sent as it is.
    """

    def putheader(self, header: str, *values: str) -> None:
        if len(values) == 1 and type(values[0]) is str and values[0] is not SKIP_HEADER:
            name = header.encode("ascii")
            value = values[0].encode("latin-1")
            if not _LEGAL_HEADER_NAME(name):
                raise ValueError(f"Invalid header name {name!r}")
            if _ILLEGAL_HEADER_VALUE(value):
                raise ValueError(f"Invalid header value {value!r}")
            self._output(name + b": " + value)  # type: ignore[attr-defined]
        else:
            super().putheader(header, *values)  # type: ignore[misc]


#: Header calls the start-time trial makes both ways.
_TRIAL_HEADERS = [("Host", ("up",)), ("X-Latin", ("café",)), ("X-Folded", ("a\r\n b",)),
                  ("User-Agent", (SKIP_HEADER,)), ("X-Two", ("a", "b"))]


def _check_header_lines() -> str | None:
    if not callable(getattr(http.client.HTTPConnection, "_output", None)):
        return "http.client.HTTPConnection has no _output"
    buffers = []
    for cls in (UpstreamHTTPConnection,
                type("Trial", (OneStepPutheader, UpstreamHTTPConnection), {})):
        connection = cls("127.0.0.1", 1)
        try:
            connection.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
            for name, values in _TRIAL_HEADERS:
                connection.putheader(name, *values)
            buffers.append(list(getattr(connection, "_buffer", [])))
        except Exception as exc:  # noqa: BLE001 (any failure means: use the stock path)
            return f"a trial of header lines failed: {type(exc).__name__}"
    if buffers[0] != buffers[1] or not buffers[0]:
        return "header lines differ from http.client's"
    return None


# -- header_block ----------------------------------------------------------------------------

#: A header name as the email parser takes it: printable ASCII but space and colon.
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def parse_headers(fp: IO[bytes],
                  _class: type[http.client.HTTPMessage] = http.client.HTTPMessage
                  ) -> http.client.HTTPMessage:
    """:func:`http.client.parse_headers`, without the email package for the usual block.

    http.client reads every answer's header block with the email parser, which is made for
    mail. Here, plain ``Name: value`` lines are split directly into the same message; any
    other block (folded lines, a name the email parser would not take, no blank line at the
    end) goes to the email parser as before. The result is the same either way.
    """
    lines = []
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            break
    message = _class()
    if line:
        for raw in lines[:-1]:
            field = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]  # each ends in a newline
            name, colon, value = field.decode("iso-8859-1").partition(":")
            if not colon or "\r" in value or not _HEADER_NAME.fullmatch(name):
                break
            message.set_raw(name, value.lstrip(" \t"))
        else:
            message.set_payload("")
            return message
    return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))


def begin_without_email(self: Any) -> None:
    """http.client's ``HTTPResponse.begin`` (Python 3.11 to 3.14), written out with
    :func:`parse_headers` for the header block; status lines go through http.client's own
    ``_read_status`` (its errors included)."""
    while True:
        version, status, reason = self._read_status()
        if status != http.client.CONTINUE:
            break
        parse_headers(self.fp)  # the header block of a 100 answer, skipped as begin skips it
    self.code = self.status = status
    self.reason = reason.strip()
    if version in ("HTTP/1.0", "HTTP/0.9"):
        self.version = 10
    elif version.startswith("HTTP/1."):
        self.version = 11
    else:
        raise http.client.UnknownProtocol(version)
    self.headers = self.msg = parse_headers(self.fp)
    coding = self.headers.get("transfer-encoding")
    if coding and coding.lower() == "chunked":
        self.chunked = True
        self.chunk_left = None
    else:
        self.chunked = False
    self.will_close = self._check_close()
    self.length = None
    length = self.headers.get("content-length")
    if length and not self.chunked:
        try:
            self.length = int(length)
        except ValueError:
            self.length = None
        else:
            if self.length < 0:
                self.length = None
    if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
        self.length = 0
    if not self.will_close and not self.chunked and self.length is None:
        self.will_close = True


class _TrialSocket:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> IO[bytes]:
        return io.BytesIO(self.data)


#: Answers read both ways at start (with the method asked).
_TRIAL_ANSWERS = [
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A:  spaced  \r\n"
            b"X-Folded: one\r\n two\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"Content-Length: 2\r\n\r\nok"),
    ("GET", b"HTTP/1.1 201 Created\nTransfer-Encoding: chunked\n\n2\r\nab\r\n0\r\n\r\n"),
    ("GET", b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil the end"),
    ("GET", b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nno length"),
]


def _check_header_block() -> str | None:
    for name in ("_read_status", "_check_close"):
        if not callable(getattr(http.client.HTTPResponse, name, None)):
            return f"http.client.HTTPResponse has no {name}"
    # Every attribute the stock begin sets (any a later Python adds included) must come out
    # the same, and the body must read the same.
    for method, answer in _TRIAL_ANSWERS:
        results = []
        for read_head in (http.client.HTTPResponse.begin, begin_without_email):
            response = http.client.HTTPResponse(_TrialSocket(answer),  # type: ignore[arg-type]
                                                method=method)
            try:
                read_head(response)
                state = {k: v for k, v in vars(response).items() if k not in ("fp", "headers",
                                                                               "msg")}
                results.append((state, response.headers.items(), response.read()))
            except Exception as exc:  # noqa: BLE001 (any failure means: use the stock path)
                return f"a trial of header blocks failed: {type(exc).__name__}"
        if results[0] != results[1]:
            return "http.client's begin sets otherwise than its fast path"
    return None


# -- histogram_batches -----------------------------------------------------------------------

#: prometheus_client releases whose Histogram keeps its state as read here (0.26 is the one
#: pinned and tested; setup.cfg allows the same range).
HISTOGRAM_VERSIONS = ((0, 20), (0, 26))


def histogram_batches(histogram: Any, values: list[float]) -> None:
    """Add ``values`` to the labelled ``histogram`` child as ``observe`` would one by one: the
    sum once, and each bucket's count once (prometheus_client keeps bucket counts per bucket,
    not cumulative: a value counts in the first bucket whose bound is at least the value)."""
    if not values:
        return
    bounds = histogram._upper_bounds
    counts: dict[int, int] = {}
    for value in values:
        index = bisect.bisect_left(bounds, value)
        counts[index] = counts.get(index, 0) + 1
    histogram._sum.inc(sum(values))
    buckets = histogram._buckets
    for index, n in counts.items():
        buckets[index].inc(n)


def _check_histogram_batches() -> str | None:
    try:
        found = version("prometheus-client")
    except PackageNotFoundError:
        return "prometheus-client's version is unknown"
    release = tuple(int(part) for part in re.findall(r"\d+", found)[:2])
    if not HISTOGRAM_VERSIONS[0] <= release <= HISTOGRAM_VERSIONS[1]:
        return f"prometheus-client {found} is not a release this was checked against"
    names = set(Histogram.observe.__code__.co_names) | set(Histogram._metric_init.__code__.co_names)
    missing = {"_upper_bounds", "_buckets", "_sum"} - names
    if missing:
        return f"prometheus_client's Histogram no longer uses {', '.join(sorted(missing))}"
    return None


# -- the switch ------------------------------------------------------------------------------

_CHECKS: dict[str, Callable[[], str | None]] = {
    "kernel_timeouts": _check_kernel_timeouts,
    "header_lines": _check_header_lines,
    "header_block": _check_header_block,
    "histogram_batches": _check_histogram_batches,
}
assert tuple(_CHECKS) == FAST_PATH_NAMES


@functools.cache
def _unavailable(name: str) -> str | None:
    """Why fast path ``name`` cannot be used with the installed libraries (checked once per
    process, warned about once), or ``None``."""
    why = _CHECKS[name]()
    if why is not None:
        log.warning("fast path %s is off, the stock path is used instead: %s", name, why)
    return why


def available(requested: frozenset[str]) -> frozenset[str]:
    """The requested fast paths that the installed libraries allow."""
    return frozenset(name for name in FAST_PATH_NAMES
                     if name in requested and _unavailable(name) is None)


def transport_classes(enabled: frozenset[str], addresses: AddressPolicy
                      ) -> dict[str, type[HTTPConnectionPool]]:
    """The pool classes of a transport (by scheme): the stock connections of
    :mod:`~gateway_app.transport` with the ``enabled`` fast paths in place."""
    response: type[UpstreamHTTPResponse] = UpstreamHTTPResponse
    if "header_block" in enabled:
        response = type("FastUpstreamHTTPResponse", (UpstreamHTTPResponse,),
                        {"read_head": begin_without_email})
    mixins: tuple[type, ...] = (OneStepPutheader,) if "header_lines" in enabled else ()
    attributes = {"response_class": response, "addresses": addresses}
    plain = type("HTTPConnection", (*mixins, UpstreamHTTPConnection), {
        **attributes,
        "socket_class": KernelTimedSocket if "kernel_timeouts" in enabled else DeadlineSocket,
    })
    tls = type("HTTPSConnection", (*mixins, UpstreamHTTPSConnection), attributes)
    return {
        "http": type("HTTPPool", (HTTPConnectionPool,), {"ConnectionCls": plain}),
        "https": type("HTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": tls}),
    }
