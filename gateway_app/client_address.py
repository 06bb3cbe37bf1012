"""Who is calling: the client address, believing ``X-Forwarded-For`` only from trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from .addresses import Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: Sequence[Network]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in net for net in networks)


def client_address(environ: Mapping[str, Any], trusted: Sequence[Network]) -> str | None:
    """The client's address: the TCP peer, unless the peer is a trusted proxy; ``None`` when a
    trusted proxy sent a malformed ``X-Forwarded-For`` (the client is then unknown: never the
    proxy's own address, which may be one the admin API allows).

    Behind trusted proxies, ``X-Forwarded-For`` is read from the right, skipping trusted hops;
    the first untrusted address is the client (the leftmost entries can be forged by anyone).
    """
    peer = environ.get("REMOTE_ADDR") or ""
    if not trusted or not in_networks(peer, trusted):
        return peer
    chain = [p.strip() for p in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if p.strip()]
    for hop in reversed(chain):
        ip = _ip(hop)
        if ip is None:
            return None  # a malformed chain: believe nothing in it
        if not any(ip in net for net in trusted):
            return ip.compressed
    return _ip(chain[0]).compressed if chain else peer  # type: ignore[union-attr]
