"""Forwarding: one transport per worker, header filtering, streaming, and every error of the
HTTP libraries turned into the gateway's own.

The :class:`Forwarder` sends each request through requests' :class:`~requests.adapters.
HTTPAdapter` over the pooled connections of :mod:`~gateway_app.transport`, with the fast
paths of :mod:`~gateway_app.fastpaths` that are switched on and available. The request is
prepared by hand and given to the adapter, with no ``Session``: requests would re-quote the
URL, merge settings, run hooks and read ``trust_env`` on every call. Nothing on the shared
objects is mutated per request. Health probes go through the same forwarder, so they meet the
same TLS settings and address checks as the traffic.

Of the exchanges with upstreams (traffic and health probes alike), this is the only module that
catches the exceptions of requests, urllib3, http.client and the upstream socket (the identity
provider's fetches in :mod:`~gateway_app.jwks` and the registration clients catch their own):
:func:`upstream_error` turns each into a :class:`~gateway_app.errors.GatewayError` (502 or
504) before the answer starts; after it, :func:`stream_body` cuts the connection
(:class:`UpstreamAborted`).
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
from collections.abc import Iterator
from typing import IO, Any

import requests
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.util import SKIP_HEADER

from . import fastpaths, transport
from .addresses import AddressPolicy
from .errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    PayloadTooLarge,
    RequestTimeout,
)
from .settings import FAST_PATH_NAMES
from .transport import Adapter, Deadline, RefusedAddressError, UpstreamRequest, UpstreamResponse
from .upstream_head import UpstreamProtocolError

log = logging.getLogger("gateway.forwarding")

#: Bytes read from a body (either direction) at a time.
CHUNK_SIZE = 64 * 1024
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
        #: The upstream exchange's deadline: time spent waiting for the client's body is
        #: added to it (a slow client is not the upstream's fault).
        self.deadline: Deadline | None = None
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
        deadline = self.deadline
        started = time.monotonic() if deadline is not None else 0.0
        try:
            data = self._stream.read(size if size and size > 0 else CHUNK_SIZE)
        except TimeoutError:
            raise self._fail(RequestTimeout("the request body stopped arriving")) from None
        except Exception as exc:  # whatever the server's input stream raises on a broken read
            raise self._fail(BadRequest(f"the request body could not be read: "
                                        f"{type(exc).__name__}")) from None
        finally:
            if deadline is not None:
                deadline.at += time.monotonic() - started
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
    """The upstream failed after the response headers went out: the connection is cut.
    ``kind`` is the failure's, as :func:`upstream_error` names it."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


#: Headers urllib3 and http.client add of their own when a request has none (their
#: ``User-Agent``, and ``Accept-Encoding: identity``); a proxy adds neither.
_NOT_ADDED = ("User-Agent", "Accept-Encoding")
#: The ``User-Agent`` of health probes.
PROBE_USER_AGENT = "gateway-health-check"
#: What the HTTP libraries and the upstream socket raise for a failed exchange.
TRANSPORT_ERRORS = (requests.RequestException, HTTPError, http.client.HTTPException, OSError)


class Forwarder:
    """Sends requests to upstream instances over per-process pooled connections."""

    def __init__(self, pool_size: int, ca_bundle: str | None = None,
                 addresses: AddressPolicy | None = None,
                 fast_paths: frozenset[str] = frozenset(FAST_PATH_NAMES)) -> None:
        #: The fast paths in use: those asked for that the installed libraries allow.
        self.fast_paths = fastpaths.available(fast_paths)
        # No requests.Session: the adapter is called directly, so a session's cookie jar,
        # environment proxies and mounts would never be consulted.
        self.adapter = Adapter(
            transport.tls_context(ca_bundle),
            fastpaths.transport_classes(self.fast_paths, addresses or AddressPolicy()),
            pool_connections=256, pool_maxsize=pool_size, max_retries=0)

    def close(self) -> None:
        self.adapter.close()

    def send(self, instance: Any, method: str, target: str, headers: dict[str, str],
             body: BodyReader | bytes | None, connect_timeout: float, read_timeout: float,
             deadline: Deadline | None = None) -> UpstreamResponse:
        """Send one request; the response's body is left unread, to be streamed. Everything
        up to the answer's head ends by ``deadline``."""
        for name in _NOT_ADDED:
            # Not sent (or spelt otherwise by a policy: that spelling still goes up, as the
            # marker itself is never written) means the library adds none of its own.
            if name not in headers:
                headers[name] = SKIP_HEADER
        if deadline is not None:
            connect_timeout = min(connect_timeout, max(0.001, deadline.remaining()))
        request = UpstreamRequest(instance, method, target, headers, body)
        exchange = transport.enter(target, deadline)
        try:
            response: UpstreamResponse = self.adapter.send(  # type: ignore[assignment]
                request, stream=True, proxies={}, timeout=(connect_timeout, read_timeout))
        except (*TRANSPORT_ERRORS, ClientBodyError) as exc:
            if isinstance(body, BodyReader):
                _raise_for_body(body)
            raise upstream_error(exc, instance) from None
        finally:
            transport.leave(exchange)
        response.deadline = deadline
        return response

    def probe(self, instance: Any, target: str, timeout: float) -> int:
        """A health probe: ``GET target`` within ``timeout`` in all, through the same pools,
        TLS settings and address checks as the traffic; the status, or a GatewayError."""
        headers = {"Host": instance.origin.partition("://")[2], "User-Agent": PROBE_USER_AGENT}
        answer = self.send(instance, "GET", target, headers, None, timeout, timeout,
                           Deadline(timeout))
        try:
            read_upto(answer, CHUNK_SIZE)  # a small body is read, so the connection is kept
        finally:
            release(answer)
        return answer.status_code


def _raise_for_body(body: BodyReader) -> None:
    if body.client_error is not None:
        raise body.client_error


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (requests wraps urllib3's errors, which wrap http.client's
    and the socket's), outermost first."""
    found: list[BaseException] = []
    pending = [exc]
    while pending and len(found) < 16:
        current = pending.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            pending.append(reason)
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return found


def upstream_error(exc: BaseException, instance: Any, mid_body: bool = False) -> GatewayError:
    """The gateway's error for a failed exchange with ``instance``, logged: 504 for a timeout,
    502 otherwise. ``safe_to_retry`` when nothing of the request can have reached it."""
    causes = _causes(exc)

    def has(*types: type[BaseException]) -> BaseException | None:
        return next((cause for cause in causes if isinstance(cause, types)), None)

    safe = False
    error: type[GatewayError] = BadGateway
    detail = type(causes[-1]).__name__
    if refused := has(RefusedAddressError):
        kind, what, safe = "address_refused", "resolves to a refused address", True
        detail = str(getattr(refused, "refused", refused))
    elif has(NameResolutionError):
        kind, what, safe = "name_unresolved", "has a host name that does not resolve", True
    elif has(requests.ConnectTimeout) or (has(ConnectTimeoutError)
                                          and not has(NewConnectionError)):
        error, kind, what, safe = (GatewayTimeout, "connect_timeout",
                                   "did not accept the connection in time", True)
    elif has(NewConnectionError):
        kind, what, safe = "connect_refused", "refused the connection", True
    elif has(requests.exceptions.SSLError, Urllib3SSLError, ssl.SSLError,
             ssl.CertificateError):
        kind, what = "tls", "failed TLS verification"
    elif has(requests.Timeout, ReadTimeoutError, TimeoutError):
        error, kind = GatewayTimeout, "timeout"
        what = "did not finish its answer in time" if mid_body else "did not answer in time"
    elif protocol := has(UpstreamProtocolError):
        kind, what, detail = "protocol", "sent a malformed answer", str(protocol)
    elif mid_body:
        kind, what = "aborted", "failed mid-answer"
    elif has(http.client.RemoteDisconnected, ConnectionError):
        kind, what = "reset", "closed the connection before answering"
    elif has(http.client.HTTPException, requests.exceptions.InvalidHeader):
        kind, what = "protocol", "sent a malformed answer"
    else:
        kind, what = "failed", "failed before answering"
    log.warning("upstream %s of service %s %s: %s", instance.origin, instance.service, what,
                detail)
    gateway_error = error(f"upstream {instance.service} instance {instance.id} {what}")
    gateway_error.safe_to_retry = safe
    gateway_error.kind = kind
    return gateway_error


def read_upto(upstream: UpstreamResponse, limit: int) -> bytes:
    """Read at most ``limit`` bytes of the upstream's body, before any header went out, within
    the exchange's deadline: a failure here is still a 502 or 504 for the client."""
    chunks, total = [], 0
    exchange = transport.enter(None, upstream.deadline)
    try:
        while total < limit:
            chunk = upstream.raw.read(min(CHUNK_SIZE, limit - total), decode_content=False)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except TRANSPORT_ERRORS as exc:
        raise upstream_error(exc, upstream.request.instance, mid_body=True) from None
    finally:
        transport.leave(exchange)
    return b"".join(chunks)


def open_body(upstream: UpstreamResponse) -> Iterator[bytes]:
    """The upstream's body as it arrives, untouched (no decompression), its first chunk read
    already, within the exchange's deadline: a failure there is still a 502 or 504 for the
    client. A later one cuts the connection (see :func:`stream_body`)."""
    chunks = upstream.raw.stream(CHUNK_SIZE, decode_content=False)
    exchange = transport.enter(None, upstream.deadline)
    try:
        first = next(chunks, b"")
    except TRANSPORT_ERRORS as exc:
        raise upstream_error(exc, upstream.request.instance, mid_body=True) from None
    finally:
        transport.leave(exchange)
    return _relay(first, chunks, upstream)


def _relay(first: bytes, chunks: Iterator[bytes], upstream: UpstreamResponse
           ) -> Iterator[bytes]:
    if first:
        yield first
        yield from stream_body(upstream, chunks)


def stream_body(upstream: UpstreamResponse, chunks: Iterator[bytes] | None = None
                ) -> Iterator[bytes]:
    """Yield the upstream's body as it arrives (the rest of ``chunks``, when given), once
    the answer has started. A failure is logged and raised as :class:`UpstreamAborted`, so
    the server cuts the connection and the client sees an incomplete body, never a spliced
    error text."""
    try:
        yield from (chunks if chunks is not None
                    else upstream.raw.stream(CHUNK_SIZE, decode_content=False))
    except TRANSPORT_ERRORS as exc:
        error = upstream_error(exc, upstream.request.instance, mid_body=True)
        raise UpstreamAborted(error.description or "", error.kind) from None


def release(upstream: UpstreamResponse) -> None:
    """Return the connection to the pool, or close it if the body was not read to the end."""
    raw = upstream.raw
    if not raw.isclosed():
        raw.close()
    raw.release_conn()
