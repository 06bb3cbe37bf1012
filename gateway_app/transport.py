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
* **A strict head** (:mod:`~gateway_app.upstream_head`). Interim (1xx) answers are skipped; a
  head that HTTP does not allow (a bad status, field name or value, a bare CR, an unusable
  Content-Length or Transfer-Encoding) is refused with ``UpstreamProtocolError`` before
  anything of it reaches the client.

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
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import SKIP_HEADER

from .addresses import AddressPolicy, AddressRefused
from .upstream_head import UpstreamHTTPResponse


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
