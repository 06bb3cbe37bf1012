"""Forwarding: one pooled ``requests.Session`` per worker, header filtering, streaming.

The Session and its :class:`~requests.adapters.HTTPAdapter` own the connection pools (sized to
the worker's thread count) and the TLS settings. Each call speaks through the adapter's urllib3
pool directly rather than through ``Session.request``: requests would re-quote the URL (the
spec wants the client's path and query byte for byte), run its cookie jar, hooks and settings
merge on every call, and read ``trust_env``. Nothing is mutated on the shared Session per
request, and its cookie policy accepts no cookie, so one client's cookies never reach another.

This is the only module that catches the HTTP client's exceptions; it turns them into
:class:`~gateway_app.errors.GatewayError` subclasses (502 or 504).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from http.cookiejar import DefaultCookiePolicy
from typing import IO, Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)

from .errors import BadGateway, BadRequest, GatewayTimeout, PayloadTooLarge

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
    "x-authenticated-subject",
})


def connection_tokens(value: str | None) -> frozenset[str]:
    """Header names listed in a ``Connection`` header, lower-cased."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


class _Adapter(HTTPAdapter):
    """An adapter whose pools verify https upstreams with our own TLS context."""

    def __init__(self, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        pool_kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


class BodyReader:
    """The client's request body as a file-like object for urllib3, bounded in size.

    Errors reading from the client are remembered, so a failed upload is reported as the
    client's fault (400) or as too large (413), not as the upstream's (502).
    """

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._remaining = limit
        self.too_large = False
        self.client_error: Exception | None = None

    def read(self, size: int = CHUNK_SIZE) -> bytes:
        try:
            data = self._stream.read(size if size and size > 0 else CHUNK_SIZE)
        except Exception as exc:  # whatever the server's input stream raises on a broken read
            self.client_error = exc
            raise
        self._remaining -= len(data)
        if self._remaining < 0:
            self.too_large = True
            raise OSError("request body over the limit")
        return data


class UpstreamAborted(Exception):
    """The upstream failed after the response headers went out: the connection is cut."""


class Forwarder:
    """Sends requests to upstream instances over per-process pooled connections."""

    def __init__(self, pool_size: int, ca_bundle: str | None = None) -> None:
        context = ssl.create_default_context(cafile=ca_bundle)
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        adapter = _Adapter(context, pool_connections=64, pool_maxsize=pool_size,
                           max_retries=0, pool_block=False)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._pools = adapter.poolmanager

    def close(self) -> None:
        self.session.close()

    def send(self, instance: Any, method: str, target: str, headers: dict[str, str],
             body: BodyReader | None, chunked: bool, connect_timeout: float,
             read_timeout: float) -> urllib3.BaseHTTPResponse:
        """Send one request; the response is returned unread (its body is streamed later)."""
        pool = self._pools.connection_from_host(instance.host, instance.port, instance.scheme)
        try:
            return pool.urlopen(
                method, target, body=body, headers=headers, chunked=chunked,
                redirect=False, assert_same_host=False, retries=False,
                preload_content=False, decode_content=False, release_conn=False,
                timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            )
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            if body is not None:
                _raise_for_body(body)
            raise GatewayTimeout(_describe(exc, instance)) from None
        except NewConnectionError as exc:
            raise BadGateway(_describe(exc, instance)) from None
        except (HTTPError, OSError) as exc:
            if body is not None:
                _raise_for_body(body)
            if isinstance(exc, MaxRetryError) and isinstance(exc.reason, ConnectTimeoutError):
                raise GatewayTimeout(_describe(exc, instance)) from None
            raise BadGateway(_describe(exc, instance)) from None


def _raise_for_body(body: BodyReader) -> None:
    if body.too_large:
        raise PayloadTooLarge()
    if body.client_error is not None:
        raise BadRequest("the request body could not be read")


def _describe(exc: Exception, instance: Any) -> str:
    kind = {
        ConnectTimeoutError: "did not accept the connection in time",
        ReadTimeoutError: "did not answer in time",
        NewConnectionError: "refused the connection",
    }.get(type(exc), "failed before answering")
    log.warning("upstream %s of %s %s: %s", instance.origin, instance.service, kind,
                type(exc).__name__)
    return f"upstream {instance.service} instance {instance.id} {kind}"


def stream_body(upstream: urllib3.BaseHTTPResponse, description: str) -> Iterator[bytes]:
    """Yield the upstream's body as it arrives, untouched (no decompression).

    A failure mid-body is logged and raised, so the server cuts the connection and the client
    sees an incomplete body, never a spliced error text.
    """
    try:
        yield from upstream.stream(CHUNK_SIZE, decode_content=False)
    except (HTTPError, OSError) as exc:
        log.warning("upstream %s failed mid-body: %s", description, type(exc).__name__)
        raise UpstreamAborted(description) from None


def release(upstream: urllib3.BaseHTTPResponse) -> None:
    """Return the connection to the pool, or close it if the body was not read to the end."""
    if not upstream.isclosed():
        upstream.close()
    upstream.release_conn()
