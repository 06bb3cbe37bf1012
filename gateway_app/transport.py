"""The transport: how a request reaches an upstream and its answer comes back, on the
libraries' own extension points.

requests' :class:`~requests.adapters.HTTPAdapter` over urllib3's connection pools, with:

* **Connect-time checks.** A connection resolves its host when it connects, checks every
  address (:class:`~gateway_app.addresses.AddressPolicy`) and connects to a checked address,
  by IP: no second lookup that DNS rebinding could change.
* **The target as sent.** urllib3 normalises a request target (``%2f`` becomes ``%2F``); the
  client's own is put back in the request line.
* **One deadline per exchange.** Every receive and send on an upstream socket ends by the
  exchange's :class:`Deadline` (connect, send, wait and head, across retries), not only by
  its per-operation timeout: an upstream sending a byte at a time is cut off at the deadline.
* **A strict head.** Interim (1xx) answers are skipped; a head that HTTP does not allow (a bad
  status, field name or value, a bare CR, an unusable Content-Length or Transfer-Encoding) is
  refused with :class:`UpstreamProtocolError` before anything of it reaches the client.

Only the libraries' documented hooks are used:

* requests: ``HTTPAdapter``'s subclassing hooks;
* urllib3: ``PoolManager.pool_classes_by_scheme`` and ``HTTPConnectionPool.ConnectionCls``;
* urllib3: the ``HTTPConnection.host`` setter;
* http.client: ``HTTPConnection.connect``, ``putrequest`` and ``putheader``;
* http.client: ``HTTPConnection.response_class`` and ``HTTPResponse.begin``;
* ssl: ``SSLContext.sslsocket_class``.

Faster routes through private internals are in :mod:`~gateway_app.fastpaths`; errors are
turned into the gateway's own in :mod:`~gateway_app.forwarding`.
"""

from __future__ import annotations

import contextvars
import http.client
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import IO, Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import SKIP_HEADER

from .addresses import AddressPolicy, AddressRefused


class Deadline:
    """The moment (``time.monotonic()``) an upstream exchange must be over by."""

    __slots__ = ("at",)

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()


#: The exchange in progress on this thread: the request target exactly as the client wrote
#: it, and the exchange's deadline. Set by the forwarder around each call into the libraries.
_exchange: contextvars.ContextVar[tuple[str | None, Deadline | None] | None] = \
    contextvars.ContextVar("upstream_exchange", default=None)


def enter(target: str | None, deadline: Deadline | None) -> contextvars.Token[Any]:
    """Start an exchange on this thread (undo with :func:`leave`)."""
    return _exchange.set((target, deadline))


def leave(token: contextvars.Token[Any]) -> None:
    _exchange.reset(token)


def capped(timeout: float | None) -> float | None:
    """``timeout`` for one socket operation, cut to what is left of the exchange's deadline;
    :class:`TimeoutError` when nothing is left."""
    current = _exchange.get()
    deadline = current[1] if current is not None else None
    if deadline is None:
        return timeout
    left = deadline.at - time.monotonic()
    if left <= 0:
        raise TimeoutError("the upstream exchange's deadline passed")
    if isinstance(timeout, int | float) and timeout <= left:
        return timeout
    return left


class _Bounded:
    """Receives and sends that end by the exchange's deadline. A socket's timeout bounds one
    operation; an upstream that sends a byte now and then never trips it."""

    __slots__ = ()

    def _bounded(self, operation: Callable[..., Any], *args: Any) -> Any:
        timeout = self.gettimeout()  # type: ignore[attr-defined]
        limit = capped(timeout)
        if limit == timeout:
            return operation(*args)
        self.settimeout(limit)  # type: ignore[attr-defined]
        try:
            return operation(*args)
        finally:
            self.settimeout(timeout)  # type: ignore[attr-defined]

    def recv_into(self, *args: Any) -> int:
        return self._bounded(super().recv_into, *args)  # type: ignore[misc]

    def recv(self, *args: Any) -> bytes:
        return self._bounded(super().recv, *args)  # type: ignore[misc]

    def send(self, *args: Any) -> int:
        return self._bounded(super().send, *args)  # type: ignore[misc]

    def sendall(self, *args: Any) -> None:
        self._bounded(super().sendall, *args)  # type: ignore[misc]


class DeadlineSocket(_Bounded, socket.socket):
    """A plain upstream socket bounded by the exchange's deadline."""

    __slots__ = ()

    @classmethod
    def adopt(cls, sock: socket.socket) -> socket.socket:
        """Take over ``sock``'s file descriptor (and its timeout)."""
        timeout = sock.gettimeout()
        adopted = cls(sock.family, sock.type, sock.proto, sock.detach())
        adopted.settimeout(timeout)
        return adopted


class DeadlineSSLSocket(_Bounded, ssl.SSLSocket):
    """A TLS upstream socket bounded by the exchange's deadline (``sslsocket_class``)."""


# -- the answer's head -----------------------------------------------------------------------


#: http.client's bounds on a header block: bytes per line, and lines.
MAX_LINE = 65536
MAX_HEADERS = 100


class UpstreamProtocolError(http.client.HTTPException):
    """The upstream's answer breaks HTTP in a way the gateway does not pass on (a 502)."""


#: Interim (1xx) answers skipped before the final one; past this the upstream is refused.
MAX_INTERIM_ANSWERS = 16
#: A field line (RFC 9110 section 5): a token, a colon, a value of visible characters,
#: spaces and tabs (obs-text included), ended by CRLF or a bare LF (RFC 9112 section 2.2).
#: A CR anywhere else, a control character, a space in the name: refused.
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t\x21-\x7e\x80-\xff]*\r?\n").fullmatch
#: An obsolete folded continuation line (RFC 9112 section 5.2); urllib3 unfolds it.
_FOLDED_LINE = re.compile(rb"[ \t]+[ \t\x21-\x7e\x80-\xff]*\r?\n").fullmatch
_FRAMING = (b"content-length", b"transfer-encoding")


def _status_code(line: bytes) -> int | None:
    """The status code of a status line, as http.client reads it; ``None`` for a line
    http.client refuses by itself."""
    parts = line.split(None, 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and len(parts[1]) == 3 \
            and parts[1].isdigit():
        return int(parts[1])
    return None


def _refuse_line(line: bytes) -> UpstreamProtocolError:
    name, colon, value = line.rstrip(b"\r\n").partition(b":")
    if not colon:
        what = "a header line without a colon"
    elif not re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
        what = f"the header name {name[:64]!r}"
    elif b"\r" in value:
        what = f"a bare CR in the value of {name.decode('latin-1')}"
    else:
        what = f"a control character in the value of {name.decode('latin-1')}"
    return UpstreamProtocolError(f"the upstream's answer has {what}")


class HeadReader:
    """The answer's file, as http.client reads the head from it (line by line), checked.

    Skips interim answers (1xx but 101, which the gateway never asked for); refuses a status
    outside 100-599, a malformed field line, a head cut before its blank line, and framing the
    gateway cannot relay as it is: Content-Length not exactly one number, Transfer-Encoding
    other than ``chunked``, or both at once (RFC 9112 section 6.3: a smuggling attempt).
    """

    __slots__ = ("_fp", "readline", "_framing", "_last")

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp
        #: http.client reads the status line first, then the field lines, each by readline.
        self.readline: Callable[[int], bytes] = self._status_line
        #: Lower-cased name and value of each Content-Length and Transfer-Encoding line.
        self._framing: list[tuple[bytes, bytes]] = []
        #: The last field line, for a folded line that follows it.
        self._last = b""

    def close(self) -> None:
        self._fp.close()

    def _status_line(self, limit: int = -1) -> bytes:
        for _ in range(MAX_INTERIM_ANSWERS + 1):
            line = self._fp.readline(limit)
            code = _status_code(line)
            if code is None or code >= 200:  # a final answer (or one http.client refuses)
                if code is not None and code > 599:
                    raise UpstreamProtocolError(f"the upstream answered status {code}")
                self.readline = self._field_line
                return line
            if code == 101:
                raise UpstreamProtocolError("the upstream switched protocols unasked (101)")
            self._skip_interim(limit)
        raise UpstreamProtocolError(f"more than {MAX_INTERIM_ANSWERS} interim (1xx) answers")

    def _skip_interim(self, limit: int) -> None:
        for _ in range(MAX_HEADERS + 1):
            line = self._fp.readline(limit)
            if line in (b"\r\n", b"\n"):
                return
            if not line:
                raise UpstreamProtocolError("the upstream closed inside an interim answer")
            if len(line) > MAX_LINE:
                raise http.client.LineTooLong("header line")
            if not (_FIELD_LINE(line) or _FOLDED_LINE(line)):
                raise _refuse_line(line)
        raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")

    def _field_line(self, limit: int = -1) -> bytes:
        line = self._fp.readline(limit)
        if _FIELD_LINE(line):  # the usual line first
            self._last = line
            if line[0] in b"cCtT":
                name, _, value = line.partition(b":")
                name = name.lower()
                if name in _FRAMING:
                    self._framing.append((name, value.strip()))
        elif line in (b"\r\n", b"\n"):
            if self._framing:
                self._check_framing()
        elif not line:
            raise UpstreamProtocolError("the upstream closed inside its answer's head")
        elif len(line) > MAX_LINE:
            pass  # http.client refuses it (LineTooLong)
        elif not _FOLDED_LINE(line) or not self._last:
            raise _refuse_line(line)
        elif self._last.partition(b":")[0].lower() in _FRAMING:
            raise UpstreamProtocolError("a folded Content-Length or Transfer-Encoding line")
        return line

    def _check_framing(self) -> None:
        lengths = [value for name, value in self._framing if name == b"content-length"]
        codings = [value for name, value in self._framing if name == b"transfer-encoding"]
        if codings:
            if lengths:
                raise UpstreamProtocolError("the upstream sent both Content-Length and "
                                            "Transfer-Encoding")
            if len(codings) > 1 or codings[0].lower() != b"chunked":
                raise UpstreamProtocolError("the upstream's Transfer-Encoding is not chunked")
        elif len(lengths) > 1 or not lengths[0].isdigit():
            raise UpstreamProtocolError("the upstream's Content-Length is not one number")


class UpstreamHTTPResponse(http.client.HTTPResponse):
    """http.client's response, reading its head through a :class:`HeadReader`."""

    #: Reads the status line and the header block: http.client's own ``begin``
    #: (:mod:`~gateway_app.fastpaths` may give a transport a faster one).
    read_head = http.client.HTTPResponse.begin

    def begin(self) -> None:
        if self.headers is not None:
            return
        fp = self.fp
        reader = HeadReader(fp)  # type: ignore[arg-type]
        self.fp = reader  # type: ignore[assignment]
        try:
            self.read_head()
        finally:
            if self.fp is reader:  # (http.client drops its file when it refuses the status)
                self.fp = fp


# -- connections -----------------------------------------------------------------------------


class RefusedAddressError(NewConnectionError):
    """The upstream's host is, or resolves to, an address the gateway never connects to."""

    def __init__(self, conn: Any, refused: AddressRefused) -> None:
        super().__init__(conn, str(refused))
        self.refused = refused


class UpstreamHTTPConnection(HTTPConnection):
    """urllib3's connection, to checked addresses only, sending the client's own target."""

    #: What may be connected to (each transport sets its own).
    addresses: AddressPolicy = AddressPolicy()
    #: The socket class a plain connection's socket becomes.
    socket_class: Any = DeadlineSocket
    response_class = UpstreamHTTPResponse

    def __init__(self, host: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(host, *args, **kwargs)
        #: The host as registered: resolved and checked every time the connection opens.
        self.upstream_host = host

    def connect(self) -> None:
        name, timeout = self.upstream_host, self.timeout
        try:
            addresses = self.addresses.resolve(name, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(name, self, exc) from None  # type: ignore[arg-type]
        except AddressRefused as exc:
            raise RefusedAddressError(self, exc) from None
        last = len(addresses) - 1
        for index, (_family, ip) in enumerate(addresses):
            # urllib3 connects to ``host``: an IP literal, so it resolves nothing itself.
            self.host = ip
            try:
                self.timeout = capped(timeout)  # type: ignore[assignment]
                super().connect()
                break
            except TimeoutError:  # the deadline passed before this attempt
                raise ConnectTimeoutError(self, f"connection to {name} timed out (the "
                                                "exchange's deadline passed)") from None
            except (NewConnectionError, ConnectTimeoutError):
                if index == last:
                    raise
            finally:
                self.host, self.timeout = name, timeout
        self._bind_socket()

    def _bind_socket(self) -> None:
        self.sock = self.socket_class.adopt(self.sock)

    def putrequest(self, method: str, url: str, skip_host: bool = False,
                   skip_accept_encoding: bool = False) -> None:
        current = _exchange.get()
        target = current[0] if current is not None else None
        super().putrequest(method, target or url, skip_host=skip_host,
                           skip_accept_encoding=skip_accept_encoding)

    def putheader(self, header: str, *values: Any) -> None:  # type: ignore[override]
        """Only urllib3's ``SKIP_HEADER`` object itself skips a header (the forwarder passes it
        for the headers a proxy must not add); a client's value that merely equals it is sent
        as it is (urllib3 compares by value: it would drop the client's ``User-Agent``, or
        refuse any other header)."""
        for value in values:
            if value == SKIP_HEADER and value is not SKIP_HEADER:
                http.client.HTTPConnection.putheader(self, header, *values)
                return
        super().putheader(header, *values)


class UpstreamHTTPSConnection(UpstreamHTTPConnection, HTTPSConnection):
    """The same over TLS: the certificate is checked against the registered host name while
    the connection goes to the checked address."""

    def __init__(self, host: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(host, *args, **kwargs)
        if self.server_hostname is None:
            self.server_hostname = host

    def _bind_socket(self) -> None:
        """The TLS context's ``sslsocket_class`` made the socket a :class:`DeadlineSSLSocket`."""


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The context every https upstream is verified with, requests and probes alike: the
    configured CA bundle, else the system's CAs (requests alone would use certifi's), host
    names checked."""
    context = ssl.create_default_context(cafile=ca_bundle)
    context.sslsocket_class = DeadlineSSLSocket
    return context


# -- the adapter -----------------------------------------------------------------------------


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


class UpstreamResponse:
    """What the adapter answers: status, headers, and urllib3's response with its body
    unread (``raw``). requests' own Response (a cookie jar, a lock, a policy per response)
    is not made: the gateway passes ``Set-Cookie`` on as it came."""

    __slots__ = ("request", "status_code", "headers", "raw", "reason", "url", "deadline")

    def __init__(self, request: UpstreamRequest, raw: Any) -> None:
        self.request = request
        self.status_code: int = raw.status
        self.headers = raw.headers
        self.raw = raw
        self.reason = raw.reason
        self.url = request.url
        #: The exchange's deadline, for the body read before answering the client.
        self.deadline: Deadline | None = None


#: Upper bound on the origins whose pools the adapter remembers (more are simply looked up).
MAX_REMEMBERED_POOLS = 1024


class Adapter(HTTPAdapter):
    """Sends :class:`UpstreamRequest` untouched over pools of the given connection classes.

    The pool for an instance is found by its origin in one dict lookup, with TLS settings
    fixed when the pool is made, instead of requests re-parsing the URL and re-applying
    ``verify`` (a ``stat`` of the CA file) on every call.
    """

    def __init__(self, ssl_context: ssl.SSLContext, pool_classes: dict[str, Any],
                 **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        self._pool_classes = pool_classes
        self._pools: dict[str, Any] = {}
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self._pool_classes)

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

    def build_response(self, req: Any, resp: Any) -> Any:
        return UpstreamResponse(req, resp)
