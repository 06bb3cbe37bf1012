"""Header tables: which headers belong to one connection, and which the gateway owns."""

from __future__ import annotations

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
