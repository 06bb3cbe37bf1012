"""Fetching from the identity provider: its key set, or its OIDC discovery document first.

Fetches go through :func:`fetch_json`: ``http.client`` with one deadline for the whole
exchange, no redirects, no proxies, a body of at most :data:`MAX_DOCUMENT_BYTES`, https
verified against ``GATEWAY_UPSTREAM_CA_BUNDLE`` (else the system CAs), plain http to loopback
only, and every address the host resolves to checked before connecting (the connection goes to
the address that was checked).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config import ConfigError, check_provider_url

#: A key set or discovery document larger than this is refused.
MAX_DOCUMENT_BYTES = 1024 * 1024
#: The ``.well-known`` path of an OIDC discovery document (OpenID Connect Discovery 1.0, 4).
DISCOVERY_PATH = "/.well-known/openid-configuration"
_MAX_AGE_RE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE_RE = re.compile(r"(?:^|,)\s*(?:no-cache|no-store)\s*(?:,|$)", re.IGNORECASE)


class ProviderError(Exception):
    """The provider answered, but not with something usable (not JSON, a wrong issuer, no
    ``jwks_uri``, no usable key, a redirect, a refused address): a configuration matter,
    refused at start."""


class ProviderUnavailable(ProviderError):
    """The provider could not be reached, timed out, or answered 5xx/408/429: it may come
    back; the gateway starts and keeps trying."""


def _refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_link_local or ip.is_unspecified or ip.is_multicast


def _checked_connect(host: str, port: int, loopback_only: bool, deadline: float
                     ) -> socket.socket:
    """A socket connected to an address of ``host`` that passed the checks: never a
    link-local, unspecified or multicast one, and only a loopback one for plain http."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ProviderUnavailable(f"cannot resolve {host}: {exc}") from None
    allowed = []
    for family, kind, proto, _, sockaddr in infos:
        try:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if _refused(ip) or (loopback_only and not ip.is_loopback):
            continue
        allowed.append((family, kind, proto, sockaddr))
    if not allowed:
        raise ProviderError(f"{host} resolves to no address the gateway may fetch keys from "
                            + ("(plain http: loopback only)" if loopback_only
                               else "(link-local, unspecified and multicast are refused)"))
    last: OSError | None = None
    for family, kind, proto, sockaddr in allowed:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise ProviderUnavailable(f"cannot connect to {host}:{port}: {last}")


def _connection(url: str, deadline: float, ca_bundle: str | None) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    timeout = max(0.01, deadline - time.monotonic())
    conn: http.client.HTTPConnection
    if https:
        context = ssl.create_default_context(cafile=ca_bundle)
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def connect(address: Any, timeout: Any = None, source_address: Any = None) -> socket.socket:
        return _checked_connect(host, port, not https, deadline)

    # http.client's hook for making the TCP connection (TLS, for https, is wrapped around
    # what it returns, verifying the certificate against ``host``).
    conn._create_connection = connect  # type: ignore[attr-defined]
    return conn


@dataclass(frozen=True)
class Fetched:
    """A JSON document from the provider, and how long it may be kept (seconds, or ``None``
    when the provider did not say)."""

    document: Any
    max_age: float | None


def max_age(cache_control: str | None) -> float | None:
    """Seconds from a ``Cache-Control`` header: ``max-age``, 0 for ``no-cache``/``no-store``,
    ``None`` when it says neither."""
    if not cache_control:
        return None
    if _NO_CACHE_RE.search(cache_control):
        return 0.0
    match = _MAX_AGE_RE.search(cache_control)
    return float(match.group(1)) if match else None


def fetch_json(url: str, timeout: float, ca_bundle: str | None, what: str) -> Fetched:
    """GET ``url`` and parse its JSON body, within ``timeout`` seconds for everything.

    :class:`ProviderUnavailable` when it cannot be had now; :class:`ProviderError` when what
    came back is not usable."""
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn = _connection(url, deadline, ca_bundle)
    except (OSError, ValueError) as exc:  # an unreadable CA bundle, say
        raise ProviderError(f"cannot set up a connection to {url}: {exc}") from None
    try:
        try:
            conn.request("GET", target, headers={
                "Accept": "application/json", "Accept-Encoding": "identity",
                "User-Agent": "gateway-jwks"})
            response = conn.getresponse()
            status = response.status
            if status != 200:
                if 300 <= status < 400:
                    where = (response.getheader("Location") or "")[:200]
                    raise ProviderError(f"{what} at {url} answered a redirect (HTTP {status}) "
                                        f"to {where!r}; redirects are not followed: configure "
                                        "the URL it points to")
                error = (ProviderUnavailable if status >= 500 or status in (408, 429)
                         else ProviderError)
                raise error(f"{what} at {url} answered HTTP {status}")
            coding = (response.getheader("Content-Encoding") or "identity").strip().lower()
            if coding != "identity":
                raise ProviderError(f"{what} at {url} came with Content-Encoding {coding!r}")
            length = response.getheader("Content-Length")
            if length is not None and length.strip().isdigit() \
                    and int(length) > MAX_DOCUMENT_BYTES:
                raise ProviderError(f"{what} at {url} is over {MAX_DOCUMENT_BYTES} bytes")
            body = bytearray()
            while len(body) <= MAX_DOCUMENT_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProviderUnavailable(f"{what} at {url} took over {timeout:g} s")
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                chunk = response.read1(65536)
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                raise ProviderError(f"{what} at {url} is over {MAX_DOCUMENT_BYTES} bytes")
            cache_control = response.getheader("Cache-Control")
        except (OSError, http.client.HTTPException) as exc:
            kind = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            raise ProviderUnavailable(f"fetching {what} from {url} {kind}") from None
    finally:
        conn.close()
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError):
        raise ProviderError(f"{what} at {url} is not JSON") from None
    return Fetched(document, max_age(cache_control))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def discover(issuer: str, timeout: float, ca_bundle: str | None) -> str:
    """The ``jwks_uri`` of ``issuer``'s discovery document, checked: the document is a JSON
    object, its ``issuer`` is exactly ``issuer``, and its ``jwks_uri`` is a URL the gateway
    may fetch from."""
    url = issuer.rstrip("/") + DISCOVERY_PATH
    document = fetch_json(url, timeout, ca_bundle, "the OIDC discovery document").document
    if not isinstance(document, dict):
        raise ProviderError(f"the OIDC discovery document at {url} is not a JSON object")
    found = document.get("issuer")
    if found != issuer:
        shown = repr(found)[:200] if isinstance(found, str) else "none"
        raise ProviderError(f"the OIDC discovery document at {url} names the issuer {shown}, "
                            f"not {issuer!r} (GATEWAY_OIDC_ISSUER must match it exactly)")
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        raise ProviderError(f"the OIDC discovery document at {url} has no jwks_uri")
    try:
        check_provider_url(jwks_uri, "jwks_uri")
    except ConfigError as exc:
        raise ProviderError(f"the OIDC discovery document at {url}: {exc}") from None
    return jwks_uri
