"""Forwarding: one pooled ``requests.Session`` per worker, header filtering, streaming.

The Session's :class:`~requests.adapters.HTTPAdapter` owns the connection pools (sized to the
worker's thread count) and sends every request. The request is prepared by hand, not by
``Session.request``: requests would re-quote the URL (the spec wants the client's path and
query byte for byte), merge settings, run hooks and read ``trust_env`` on every call. The
adapter builds a lean response that never parses cookies, and the Session's own cookie policy
accepts none, so one client's cookies never reach another. Nothing on the shared Session is
mutated per request.

This is the only module that catches requests' exceptions; it turns them into
:class:`~gateway_app.errors.GatewayError` subclasses (502 or 504).
"""

from __future__ import annotations

import contextvars
import datetime
import email.parser
import http.client
import logging
import re
import socket
import ssl
import struct
import types
from collections.abc import Callable, Iterator
from http.cookiejar import DefaultCookiePolicy
from typing import IO, Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, NewConnectionError, ReadTimeoutError
from urllib3.util import SKIP_HEADER

from .errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    PayloadTooLarge,
    RequestTimeout,
)

log = logging.getLogger("gateway.forwarding")

#: Bytes read from a body (either direction) at a time.
CHUNK_SIZE = 64 * 1024
#: Headers that describe one connection, not the message (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
#: Request headers the gateway sets itself; a client's own values are dropped.
GATEWAY_OWNED = frozenset({
    "host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-forwarded-prefix", "x-forwarded-port", "forwarded", "x-real-ip", "x-request-id",
    "x-authenticated-subject", "via", "traceparent", "tracestate",
})


def dropped_headers(base: frozenset[str], connection: str | None) -> frozenset[str]:
    """``base`` plus the header names a ``Connection`` header lists (lower-cased); ``base``
    itself, with nothing allocated, in the usual case of no tokens beyond it."""
    if not connection:
        return base
    tokens = {t.strip().lower() for t in connection.split(",")} - {""}
    return base if tokens <= base else base | tokens


class UpstreamRequest(requests.PreparedRequest):
    """A request prepared by hand; ``target`` is the path and query exactly as sent."""

    def __init__(self, instance: Any, method: str, target: str, headers: dict[str, str],
                 body: Any) -> None:
        super().__init__()
        self.instance = instance
        self.method = method
        self.url = instance.origin + target
        self.target = target
        self.headers = headers  # type: ignore[assignment]
        self.body = body


#: The request target of the call in progress on this thread, sent exactly as the client
#: wrote it. urllib3 normalises every target it is given (``%2f`` becomes ``%2F``), so the
#: pools below put the verbatim one back just before the request line is written.
_verbatim_target: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "verbatim_target", default=None)


#: http.client's bounds on a header block: bytes per line, and lines.
_MAX_LINE = 65536
_MAX_HEADERS = 100
#: A header name as the email parser takes it: printable ASCII but space and colon.
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def parse_headers(fp: IO[bytes],
                  _class: type[http.client.HTTPMessage] = http.client.HTTPMessage
                  ) -> http.client.HTTPMessage:
    """:func:`http.client.parse_headers`, without the email package for the usual block.

    http.client reads every response's header block with the email parser, which is made for
    mail and costs a fifth of the CPU of forwarding a small response. Here, plain
    ``Name: value`` lines are split directly into the same message; any other block (folded
    lines, a stray CR, a name the email parser would not take, no blank line at the end) goes
    to the email parser as before. The result is the same either way.
    """
    lines = []
    while True:
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
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


class _UpstreamResponse(http.client.HTTPResponse):
    """http.client's response, reading its header block with :func:`parse_headers`."""

    # http.client's own begin(), run with http.client's globals but our parse_headers.
    begin = types.FunctionType(http.client.HTTPResponse.begin.__code__,
                               {**vars(http.client), "parse_headers": parse_headers})


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO/SO_SNDTIMEO; zero (the kernel's "forever") for
    ``None``, and never zero for a (tiny) timeout."""
    if seconds is None:
        return struct.pack("@ll", 0, 0)
    micros = max(1, round(seconds * 1_000_000))
    return struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)


class _KernelTimedSocket(socket.socket):
    """A blocking socket whose timeouts the kernel enforces (SO_RCVTIMEO, SO_SNDTIMEO).

    A Python socket with a timeout is non-blocking underneath: every ``settimeout`` is an
    ioctl and every send or receive a ``poll`` first, four system calls per request that
    each let go of the GIL. Here ``settimeout`` only records the value; a receive or send
    passes it to the kernel when it differs from the one the kernel already holds for that
    direction (in practice once per connection: the connect timeout for sending, the read
    timeout for receiving). A kernel timeout (EAGAIN) is raised as :class:`TimeoutError`,
    as a Python timeout would be.
    """

    __slots__ = ("_timeout", "_in_kernel")
    _timeout: float | None
    #: The timeout the kernel holds, per option (SO_RCVTIMEO, SO_SNDTIMEO); absent: none set.
    _in_kernel: dict[int, float | None]

    @classmethod
    def adopt(cls, sock: socket.socket) -> _KernelTimedSocket:
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
        if self._in_kernel.get(option) != self._timeout:
            self.setsockopt(socket.SOL_SOCKET, option, _timeval(self._timeout))
            self._in_kernel[option] = self._timeout
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


#: http.client's checks on a header line: a legal name, and no bare CR or LF in the value
#: (which would let a value start a header of its own).
_LEGAL_HEADER_NAME = re.compile(rb"[^:\s][^:\r\n]*").fullmatch
_ILLEGAL_HEADER_VALUE = re.compile(rb"\n(?![ \t])|\r(?![ \t\n])").search


class _HeaderLines:
    """``putheader`` for the usual call (one ``str`` value) in one step.

    urllib3's ``putheader`` looks for its ``SKIP_HEADER`` marker among the values, then
    http.client's checks and encodes each value: 1.3 µs a header, ten headers a request. This
    does http.client's encoding and checks directly (0.5 µs). Only the marker object itself
    (see :meth:`Forwarder.send`) and other calls go the usual way: a client's value that
    happens to equal the marker is sent as it is.
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


class _HTTPConnection(_HeaderLines, HTTPConnection):  # type: ignore[misc]
    response_class = _UpstreamResponse

    def _new_conn(self) -> socket.socket:
        return _KernelTimedSocket.adopt(super()._new_conn())


class _HTTPSConnection(_HeaderLines, HTTPSConnection):  # type: ignore[misc]
    response_class = _UpstreamResponse


class _VerbatimHTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection

    def _make_request(self, conn: Any, method: str, url: str, *args: Any,
                      **kwargs: Any) -> Any:
        return super()._make_request(conn, method, _verbatim_target.get() or url, *args,
                                     **kwargs)


class _VerbatimHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection

    def _make_request(self, conn: Any, method: str, url: str, *args: Any,
                      **kwargs: Any) -> Any:
        return super()._make_request(conn, method, _verbatim_target.get() or url, *args,
                                     **kwargs)


#: Upper bound on the origins whose pools the adapter remembers (more are simply looked up).
MAX_REMEMBERED_POOLS = 1024


class _Adapter(HTTPAdapter):
    """Sends :class:`UpstreamRequest` untouched and builds responses without cookie parsing.

    The pool for an instance is found by its origin in one dict lookup, with TLS settings fixed
    when the pool is made, instead of requests re-parsing the URL and re-applying ``verify``
    (a ``stat`` of the CA file) on every call.
    """

    def __init__(self, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        self._pools: dict[str, Any] = {}
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _VerbatimHTTPPool, "https": _VerbatimHTTPSPool,
        }

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> Any:
        instance = request.instance
        pool = self._pools.get(instance.origin)
        if pool is None or pool.pool is None:  # new, or evicted and closed by the manager
            tls = {"ssl_context": self._ssl_context} if instance.scheme == "https" else None
            pool = self.poolmanager.connection_from_host(instance.host, instance.port,
                                                         instance.scheme, pool_kwargs=tls)
            if len(self._pools) >= MAX_REMEMBERED_POOLS:
                self._pools.clear()
            self._pools[instance.origin] = pool
        return pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """Nothing to do per request: the pool's ``ssl_context`` verifies every https upstream."""

    def request_url(self, request: Any, proxies: Any) -> str:
        return request.target

    def add_headers(self, request: Any, **kwargs: Any) -> None:
        pass

    def build_response(self, req: Any, resp: Any) -> requests.Response:
        return UpstreamResponse(req, resp, self)


_NO_TIME = datetime.timedelta(0)


class UpstreamResponse(requests.Response):
    """A :class:`requests.Response` for an answer the gateway passes on untouched.

    requests gives every response a cookie jar (with a lock and a policy) that the gateway
    never reads: ``Set-Cookie`` headers go to the client as they came. The jar is made only
    if something asks for ``cookies``.
    """

    def __init__(self, request: Any, raw: Any, adapter: HTTPAdapter) -> None:
        self._content = False
        self._content_consumed = False
        self._next = None
        self.status_code = raw.status
        self.headers = raw.headers
        self.raw = raw
        self.url = request.url
        self.encoding = None
        self.history = []
        self.reason = raw.reason
        self.elapsed = _NO_TIME
        self.request = request
        self.connection = adapter

    def __getattr__(self, name: str) -> Any:
        if name == "cookies":
            self.cookies = requests.cookies.cookiejar_from_dict({})
            return self.cookies
        raise AttributeError(name)


class ClientBodyError(OSError):
    """The client's body failed while it was being sent up (cut short, malformed chunked
    framing, too slow, too large). An ``OSError``, so the HTTP libraries abandon the upstream
    connection as for any failed send; :func:`_raise_for_body` then answers the client."""


class BodyReader:
    """The client's request body as a file-like object for urllib3, bounded in size.

    A failure of the client's (the body ends before its ``Content-Length``, its chunked framing
    is malformed, it stops arriving, it grows past the limit) is remembered as the client's
    error (400, 408 or 413) and raised as :class:`ClientBodyError`: the upstream call is
    abandoned, and the instance is not blamed.
    """

    def __init__(self, stream: IO[bytes], limit: int, expected: int | None = None) -> None:
        self._stream = stream
        self._remaining = limit
        #: The declared Content-Length (``None``: chunked).
        self._expected = expected
        #: Bytes handed to the upstream connection so far.
        self.sent = 0
        #: What to answer the client, when its body failed.
        self.client_error: GatewayError | None = None
        #: Read ahead by :meth:`buffer`, not yet handed on.
        self._pending = b""

    def _fail(self, error: GatewayError) -> ClientBodyError:
        self.client_error = error
        return ClientBodyError(error.description)

    def read(self, size: int = CHUNK_SIZE) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            self.sent += len(data)
            return data
        return self._read(size)

    def _read(self, size: int = CHUNK_SIZE) -> bytes:
        try:
            data = self._stream.read(size if size and size > 0 else CHUNK_SIZE)
        except TimeoutError:
            raise self._fail(RequestTimeout("the request body stopped arriving")) from None
        except Exception as exc:  # whatever the server's input stream raises on a broken read
            raise self._fail(BadRequest(f"the request body could not be read: "
                                        f"{type(exc).__name__}")) from None
        if not data and self._expected is not None and self.sent < self._expected:
            raise self._fail(BadRequest(f"the request body ended after {self.sent} of its "
                                        f"{self._expected} bytes"))
        self._remaining -= len(data)
        if self._remaining < 0:
            raise self._fail(PayloadTooLarge())
        self.sent += len(data)
        return data

    def buffer(self, limit: int) -> bytes | None:
        """Read up to ``limit`` bytes before anything is sent: the whole body when it ends
        within them (it can then be sent again, and a malformed or cut body never reaches an
        upstream), else ``None``, and :meth:`read` hands on what was read first. Client faults
        become 400, 408 or 413 here."""
        chunks: list[bytes] = []
        total = 0
        try:
            while total <= limit:
                chunk = self._read(CHUNK_SIZE)
                if not chunk:
                    self.sent = 0
                    return b"".join(chunks)
                chunks.append(chunk)
                total += len(chunk)
        except ClientBodyError:
            _raise_for_body(self)
            raise
        self._pending, self.sent = b"".join(chunks), 0
        return None


class UpstreamAborted(Exception):
    """The upstream failed after the response headers went out: the connection is cut."""


#: Headers urllib3 and http.client add of their own when a request has none (their
#: ``User-Agent``, and ``Accept-Encoding: identity``); a proxy adds neither.
_NOT_ADDED = ("User-Agent", "Accept-Encoding")


class Forwarder:
    """Sends requests to upstream instances over per-process pooled connections."""

    def __init__(self, pool_size: int, ca_bundle: str | None = None) -> None:
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        # https upstreams are verified against the configured CA bundle, else the system's
        # CAs (requests alone would use certifi's), host names included.
        context = ssl.create_default_context(cafile=ca_bundle)
        self.adapter = _Adapter(context, pool_connections=256, pool_maxsize=pool_size,
                                max_retries=0)
        self.session.mount("http://", self.adapter)
        self.session.mount("https://", self.adapter)

    def close(self) -> None:
        self.session.close()

    def send(self, instance: Any, method: str, target: str, headers: dict[str, str],
             body: BodyReader | bytes | None, connect_timeout: float,
             read_timeout: float) -> requests.Response:
        """Send one request; the response's body is left unread, to be streamed."""
        for name in _NOT_ADDED:
            # Not sent (or spelt otherwise by a policy: that spelling still goes up, as the
            # marker itself is never written) means the library adds none of its own.
            if name not in headers:
                headers[name] = SKIP_HEADER
        request = UpstreamRequest(instance, method, target, headers, body)
        verbatim = _verbatim_target.set(target)
        try:
            return self.adapter.send(request, stream=True, proxies={},
                                     timeout=(connect_timeout, read_timeout))
        except (requests.RequestException, ClientBodyError) as exc:
            if isinstance(body, BodyReader):
                _raise_for_body(body)
            error: GatewayError = (GatewayTimeout if isinstance(exc, requests.Timeout)
                                   else BadGateway)(_describe(exc, instance))
            # Nothing of the request reached the upstream: it may safely go elsewhere.
            error.safe_to_retry = isinstance(exc, requests.ConnectTimeout) or _refused(exc)
            raise error from None
        finally:
            _verbatim_target.reset(verbatim)


def _raise_for_body(body: BodyReader) -> None:
    if body.client_error is not None:
        raise body.client_error


def _refused(exc: Exception) -> bool:
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(reason, NewConnectionError)


def _describe(exc: Exception, instance: Any) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        kind = "did not accept the connection in time"
    elif isinstance(exc, requests.Timeout):
        kind = "did not answer in time"
    elif isinstance(exc, requests.exceptions.SSLError):
        kind = "failed TLS verification"
    elif _refused(exc):
        kind = "refused the connection"
    else:
        kind = "failed before answering"
    log.warning("upstream %s of service %s %s: %s", instance.origin, instance.service, kind,
                type(exc).__name__)
    return f"upstream {instance.service} instance {instance.id} {kind}"


def stream_body(upstream: requests.Response, description: str) -> Iterator[bytes]:
    """Yield the upstream's body as it arrives, untouched (no decompression).

    A failure mid-body is logged and raised, so the server cuts the connection and the client
    sees an incomplete body, never a spliced error text.
    """
    try:
        yield from upstream.raw.stream(CHUNK_SIZE, decode_content=False)
    except (HTTPError, OSError) as exc:
        log.warning("upstream %s failed mid-body: %s", description, type(exc).__name__)
        raise UpstreamAborted(description) from None


def read_upto(upstream: requests.Response, limit: int, description: str) -> bytes:
    """Read at most ``limit`` bytes of the upstream's body, before any header went out: a
    failure here is still a 502 or 504 for the client."""
    chunks, total = [], 0
    try:
        while total < limit:
            chunk = upstream.raw.read(min(CHUNK_SIZE, limit - total), decode_content=False)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except ReadTimeoutError:
        log.warning("upstream %s timed out mid-body", description)
        raise GatewayTimeout(f"upstream {description} did not finish its answer in time") from None
    except (HTTPError, OSError) as exc:
        log.warning("upstream %s failed mid-body: %s", description, type(exc).__name__)
        raise BadGateway(f"upstream {description} failed mid-answer") from None
    return b"".join(chunks)


def release(upstream: requests.Response) -> None:
    """Return the connection to the pool, or close it if the body was not read to the end."""
    raw = upstream.raw
    if not raw.isclosed():
        raw.close()
    raw.release_conn()
