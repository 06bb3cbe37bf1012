"""The transport: how a request reaches an upstream and its answer comes back, on the
libraries' own extension points.

requests' :class:`~requests.adapters.HTTPAdapter` over urllib3's connection pools, with:

* **The target as sent.** urllib3 normalises a request target (``%2f`` becomes ``%2F``); the
  client's own is put back in the request line.

Only the libraries' documented hooks are used:

* requests: ``HTTPAdapter``'s subclassing hooks;
* urllib3: ``PoolManager.pool_classes_by_scheme`` and ``HTTPConnectionPool.ConnectionCls``;
* http.client: ``HTTPConnection.connect``, ``putrequest`` and ``putheader``;
* http.client: ``HTTPConnection.response_class`` and ``HTTPResponse.begin``;

Faster routes through private internals are in :mod:`~gateway_app.fastpaths`; errors are
turned into the gateway's own in :mod:`~gateway_app.forwarding`.
"""

from __future__ import annotations

import contextvars
import http.client
import ssl
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import SKIP_HEADER

#: The exchange in progress on this thread: the request target exactly as the client wrote
#: it. Set by the forwarder around each call into the libraries.
_exchange: contextvars.ContextVar[str | None] = \
    contextvars.ContextVar("upstream_exchange", default=None)


def enter(target: str | None) -> contextvars.Token[Any]:
    """Start an exchange on this thread (undo with :func:`leave`)."""
    return _exchange.set(target)


def leave(token: contextvars.Token[Any]) -> None:
    _exchange.reset(token)


# -- the answer's head -----------------------------------------------------------------------


#: http.client's bounds on a header block: bytes per line, and lines.
MAX_LINE = 65536
MAX_HEADERS = 100


class UpstreamHTTPResponse(http.client.HTTPResponse):
    """http.client's response; :attr:`read_head` reads its head."""

    #: Reads the status line and the header block: http.client's own ``begin``
    #: (:mod:`~gateway_app.fastpaths` may give a transport a faster one).
    read_head = http.client.HTTPResponse.begin

    def begin(self) -> None:
        if self.headers is not None:
            return
        self.read_head()


# -- connections -----------------------------------------------------------------------------


class UpstreamHTTPConnection(HTTPConnection):
    """urllib3's connection, sending the client's own target."""

    #: The socket class a plain connection's socket becomes (``None``: urllib3's own).
    socket_class: Any = None
    response_class = UpstreamHTTPResponse

    def connect(self) -> None:
        super().connect()
        self._bind_socket()

    def _bind_socket(self) -> None:
        if self.socket_class is not None:
            self.sock = self.socket_class.adopt(self.sock)

    def putrequest(self, method: str, url: str, skip_host: bool = False,
                   skip_accept_encoding: bool = False) -> None:
        target = _exchange.get()
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
    """The same over TLS."""

    def _bind_socket(self) -> None:
        """A TLS socket stays as the TLS context made it."""


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The context every https upstream is verified with, requests and probes alike: the
    configured CA bundle, else the system's CAs (requests alone would use certifi's), host
    names checked."""
    context = ssl.create_default_context(cafile=ca_bundle)
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

    __slots__ = ("request", "status_code", "headers", "raw", "reason", "url")

    def __init__(self, request: UpstreamRequest, raw: Any) -> None:
        self.request = request
        self.status_code: int = raw.status
        self.headers = raw.headers
        self.raw = raw
        self.reason = raw.reason
        self.url = request.url


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
