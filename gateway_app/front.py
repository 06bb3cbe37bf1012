"""The front door: one view of each request, taken once, at the edge, from the raw target.

:class:`FrontDoor` wraps the WSGI app. For every request it builds a :class:`RequestView` from
what the server read off the wire: the raw request target, the TCP peer, and forwarding
headers only when the peer is a trusted proxy. It then makes ``PATH_INFO`` the raw path, so
Flask routes on exactly what the client sent: ``/%65cho/a`` is not ``/echo/a``, and no header
(gunicorn's ``SCRIPT_NAME`` handling included) moves where a request goes.

Everything after the edge reads this one object, in this order: route (the service as sent),
authenticate, authorise, limit, choose, forward, respond; the access log reads it last.
Nothing downstream looks at ``PATH_INFO``, ``SCRIPT_NAME`` or a forwarded header again.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlsplit

from .addresses import AddressPolicy, ip_addresses
from .client_address import Network, client_address, in_networks
from .errors import BadRequest, Forbidden, GatewayError, LoopDetected, UnsupportedTransferCoding
from .validation import has_dot_segment

#: A request target as the gateway takes it: printable ASCII, no space, from "/".
_TARGET_RE = re.compile(r"^/[\x21-\x7e]*$")
#: A client's ``X-Request-ID`` that is kept (else a new one is made).
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: A W3C ``traceparent`` (Trace Context level 1): version, trace id, parent id, flags. Versions
#: other than 00 are read by the same four fields (the spec's forward compatibility); ff is not
#: a version.
_TRACEPARENT_RE = re.compile(
    r"^(?!ff)([0-9a-f]{2})-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})"
    r"(?:-[^\s]*)?$")
#: ``tracestate`` is passed on when at most this long (the spec's 32 members of 256 bytes fit
#: in 512 for the usual header; a longer one is dropped, not cut).
MAX_TRACESTATE_BYTES = 512
#: The flags of a trace the gateway starts: sampled, so the upstream's tracer records it.
STARTED_TRACE_FLAGS = "01"
#: The pseudonym prefix of this gateway's ``Via`` entries (RFC 9110 section 7.6.3).
VIA_PREFIX = "gateway-"
#: Gateway hops a request may already have made; one more is a loop (508).
MAX_GATEWAY_HOPS = 4
#: ``Via`` headers longer than this are not parsed: the request is refused as a loop.
MAX_VIA_BYTES = 4096


class _RequestIds:
    """New request ids: a random prefix per process and a counter, unique without a syscall
    per request (``os.urandom`` would be one). A forked child takes a prefix of its own."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


_request_ids = _RequestIds()


def raw_target(environ: dict[str, Any]) -> str:
    """The request target exactly as the client sent it, in origin form (path and query)."""
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if uri is None:  # a server that keeps no raw URI: rebuild it as faithfully as we can
        path = quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/%:@!$&'()*+,;=-._~")
        query = environ.get("QUERY_STRING", "")
        return f"{path}?{query}" if query else path
    if uri[:1] != "/":
        # Absolute form ("GET http://host/path"): route by the path only, never forward-proxy.
        scheme, sep, rest = uri.partition("://")
        if not sep or not scheme.isalpha():
            raise BadRequest("request target must be a path")
        slash = rest.find("/")
        query = rest.find("?")
        if slash < 0 or (0 <= query < slash):
            return "/" + (rest[query:] if query >= 0 else "")
        return rest[slash:]
    return uri


class RequestView:
    """Everything the gateway decides about one request, from one reading of it.

    Made by :class:`FrontDoor` before Flask sees the request; the steps of the proxy fill in
    what they decide (policy, claims, instance, timings), and the access log reads it.
    """

    __slots__ = (
        "start", "request_id", "method", "target", "path", "query", "service", "rest",
        "peer", "client", "relayed", "scheme", "host", "forwarded_for", "via", "error",
        "trace_id", "trace_flags", "tracestate",
        "policy", "public", "claims", "instance", "upstream_ms", "extra_headers",
        "request_bytes", "_start_response",
    )

    #: perf_counter() when the request reached the gateway.
    start: float
    request_id: str
    method: str
    #: The raw target in origin form; ``path`` and ``query`` (with its "?", or "") split it.
    target: str
    path: str
    query: str
    #: The first path segment exactly as sent, and what follows it ("" or "/...").
    service: str
    rest: str
    #: The TCP peer, and the client: the peer unless it is a trusted proxy.
    peer: str
    client: str
    #: The request was relayed by something that is not a trusted proxy, or came through a
    #: gateway: it never counts as coming from an admin-allowed address.
    relayed: bool
    #: What the client asked for, believing a trusted proxy's ``X-Forwarded-*`` only.
    scheme: str
    host: str
    #: The ``X-Forwarded-For`` chain of a trusted proxy, to extend ("" otherwise).
    forwarded_for: str
    #: The incoming ``Via`` header ("" when none).
    via: str
    #: Why the request is refused before anything else, if it is.
    error: GatewayError | None
    #: W3C Trace Context: the client's trace when its ``traceparent`` is valid, else a new one;
    #: its flags, and the ``tracestate`` passed on with it ("" when none).
    trace_id: str
    trace_flags: str
    tracestate: str
    policy: Any
    public: bool
    claims: dict[str, Any] | None
    instance: Any
    upstream_ms: float | None
    #: Bytes of the request's body sent upstream (for the metrics).
    request_bytes: int
    #: Headers added to the response (the rate limit's).
    extra_headers: dict[str, str] | None
    _start_response: Callable[..., Any]

    def close_connection(self) -> None:
        """Have the server close the client's connection after the response (its body was
        not read to the end, so the connection cannot carry another request). gunicorn's
        ``start_response`` is a method of its response object, which can be told so."""
        owner = getattr(self._start_response, "__self__", None)
        force_close = getattr(owner, "force_close", None)
        if force_close is not None:
            force_close()

    def authorise(self) -> None:
        """The authorise step, after the token: 403 ``forbidden`` unless the verified claims
        meet what the service's policy requires (scopes, claim values)."""
        policy = self.policy
        requirement = policy.require if policy is not None else None
        if requirement is None:
            return
        refusal = requirement.refusal(self.claims or {})
        if refusal is not None:
            raise Forbidden(refusal, headers={"WWW-Authenticate": requirement.challenge})

    def upstream_path(self) -> str:
        """The path to send up, before the instance's base path (the policy decides whether
        the ``/NAME`` prefix stays)."""
        policy = self.policy
        return self.path if policy is not None and not policy.strip_prefix else self.rest


class FrontDoor:
    """WSGI middleware: builds the request's :class:`RequestView` (``environ["gateway.view"]``)
    and routes Flask on the raw path."""

    def __init__(self, app: Callable[..., Iterable[bytes]], trusted: tuple[Network, ...],
                 node_id: str) -> None:
        self.app = app
        self.trusted = trusted
        #: This gateway's ``Via`` pseudonym.
        self.pseudonym = VIA_PREFIX + node_id

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        view = self.read(environ)
        view._start_response = start_response
        environ["gateway.view"] = view
        environ["SCRIPT_NAME"] = ""
        # The raw path (percent-encoding kept) is what Flask routes on; a refused request
        # routes nowhere and is answered from its ``error`` first.
        environ["PATH_INFO"] = view.path if view.error is None else "/"
        return self.app(environ, start_response)

    def read(self, environ: dict[str, Any]) -> RequestView:
        view = RequestView()
        view.start = time.perf_counter()
        incoming_id = environ.get("HTTP_X_REQUEST_ID")
        view.request_id = (incoming_id if incoming_id and _SANE_REQUEST_ID.match(incoming_id)
                           else _request_ids.new())
        view.method = environ.get("REQUEST_METHOD", "")
        view.error = None
        view.policy = None
        view.public = False
        view.claims = view.instance = view.upstream_ms = view.extra_headers = None
        view.request_bytes = 0

        peer = environ.get("REMOTE_ADDR") or ""
        view.peer = peer
        trusted = self.trusted
        from_proxy = bool(trusted) and in_networks(peer, trusted)
        client = client_address(environ, trusted) if from_proxy else peer
        if client is None:
            view.client = peer
            view.error = BadRequest("malformed X-Forwarded-For from a trusted proxy")
        else:
            view.client = client
        if from_proxy:
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").lower()
            view.scheme = proto if proto in ("http", "https") else environ["wsgi.url_scheme"]
            view.host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST", "")
            view.forwarded_for = environ.get("HTTP_X_FORWARDED_FOR", "")
        else:
            view.scheme = environ.get("wsgi.url_scheme", "http")
            view.host = environ.get("HTTP_HOST", "")
            view.forwarded_for = ""

        _read_trace(view, environ)
        via = environ.get("HTTP_VIA", "")
        view.via = via
        hops, own = _gateway_hops(via, self.pseudonym) if via else (0, False)
        view.relayed = hops > 0 or (not from_proxy and (
            "HTTP_VIA" in environ or "HTTP_X_FORWARDED_FOR" in environ
            or "HTTP_FORWARDED" in environ or "HTTP_X_REAL_IP" in environ))

        try:
            target = raw_target(environ)
        except BadRequest as exc:
            target, view.error = "/", view.error or exc
        path, sep, query = target.partition("?")
        view.target, view.path, view.query = target, path, sep + query
        view.service, slash, rest = path[1:].partition("/")
        view.rest = slash + rest

        if view.error is not None:
            return view
        if not _TARGET_RE.match(target) or "#" in target or has_dot_segment(path):
            view.error = BadRequest("malformed request path")
        elif own or hops > MAX_GATEWAY_HOPS:
            view.error = LoopDetected("the request has already passed through this gateway"
                                      if own else f"the request passed through {hops} gateways")
        elif environ.get("SERVER_PROTOCOL") == "HTTP/1.1" and not environ.get("HTTP_HOST"):
            view.error = BadRequest("an HTTP/1.1 request needs a Host header")
        else:
            coding = environ.get("HTTP_TRANSFER_ENCODING")
            if coding is not None and coding.strip().lower() != "chunked":
                # gzip, deflate, compress before chunked: the gateway would pass on the
                # decoded chunks without the coding they carry.
                view.error = UnsupportedTransferCoding(
                    f"transfer coding {coding.strip()!r} is not supported; send 'chunked'")
        return view


def _read_trace(view: RequestView, environ: dict[str, Any]) -> None:
    """Continue the client's trace when its ``traceparent`` is valid; otherwise start one (a
    malformed header is replaced, never passed on, and its ``tracestate`` with it)."""
    parent = (environ.get("HTTP_TRACEPARENT") or "").strip().lower()
    match = _TRACEPARENT_RE.match(parent) if parent else None
    if match is not None and (match.group(1) != "00" or len(parent) == 55):  # 00: no extra
        view.trace_id, view.trace_flags = match.group(2), match.group(4)
        state = environ.get("HTTP_TRACESTATE", "")
        view.tracestate = state if len(state) <= MAX_TRACESTATE_BYTES else ""
    else:
        view.trace_id = f"{random.getrandbits(128):032x}"
        view.trace_flags, view.tracestate = STARTED_TRACE_FLAGS, ""


def traceparent(view: RequestView) -> str:
    """The ``traceparent`` for the upstream hop: the request's trace, a new parent id."""
    return f"00-{view.trace_id}-{random.getrandbits(64) or 1:016x}-{view.trace_flags}"


def _gateway_hops(via: str, pseudonym: str) -> tuple[int, bool]:
    """How many gateways a ``Via`` header names, and whether this one is among them."""
    if len(via) > MAX_VIA_BYTES:
        return MAX_GATEWAY_HOPS + 1, False
    hops, own = 0, False
    for entry in via.split(","):
        parts = entry.split()
        if len(parts) >= 2 and parts[1].startswith(VIA_PREFIX):
            hops += 1
            own = own or parts[1] == pseudonym
    return hops, own


def via_header(view: RequestView, pseudonym: str) -> str:
    """The ``Via`` header for the upstream: the incoming one, then this gateway."""
    entry = "1.1 " + pseudonym
    return f"{view.via}, {entry}" if view.via else entry


# -- the gateway's own address -------------------------------------------------------------


def is_own_address(address: str, bind: str) -> bool:
    """True when the (normalised) upstream ``address`` is where this gateway listens
    (``bind``, ``HOST:PORT``): a request sent there would come back to the gateway."""
    if bind.startswith(("unix:", "fd://")):
        return False
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not parts.hostname or bind.rpartition(":")[2] != str(port):
        return False
    own = AddressPolicy(bind=bind)  # the check every connection makes, too
    return any(own.is_own(ip, port) for ip in ip_addresses(parts.hostname))


# -- what the server refuses before the app sees it ---------------------------------------

#: Error codes for the statuses gunicorn answers by itself (a request it could not parse).
_SERVER_ERRORS = {400: "bad_request", 403: "forbidden", 408: "request_timeout",
                  413: "payload_too_large", 414: "bad_request", 417: "bad_request",
                  431: "bad_request", 501: "not_implemented"}
_PAGE_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ([^\r\n]*)")
_PAGE_MESSAGE = re.compile(rb"</h1>\s*(.*?)\s*</body>", re.DOTALL)


class CapturedErrorPage:
    """Stands in for the client's socket while gunicorn writes one of its own error pages
    (an HTML page for a request it could not parse), to learn the status and the message it
    chose; :meth:`json` is the same answer in the gateway's error shape."""

    def __init__(self) -> None:
        self.data = bytearray()

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        self.data += data

    def json(self) -> bytes:
        """The captured answer as the gateway's JSON error, a whole HTTP/1.1 response."""
        status_match = _PAGE_STATUS.match(self.data)
        status, reason = ((int(status_match.group(1)), status_match.group(2).decode("latin-1"))
                          if status_match else (400, "Bad Request"))
        message_match = _PAGE_MESSAGE.search(self.data)
        message = (html.unescape(message_match.group(1).decode("latin-1"))
                   if message_match else "") or reason
        return error_page(status, reason, message)


def error_page(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response in the gateway's JSON error shape, for answers the server
    writes itself (the connection is closed after it)."""
    error = _SERVER_ERRORS.get(status, "internal_error" if status >= 500 else "bad_request")
    request_id = _request_ids.new()
    body = json.dumps({"error": error, "message": message, "request_id": request_id},
                      ensure_ascii=True).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-ID: {request_id}\r\n\r\n").encode("latin-1") + body
