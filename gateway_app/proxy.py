"""The proxy blueprint: ``ANY /NAME[/REST]`` goes to an instance of service NAME.

Checks run in the order of SPEC section 5: a malformed path (400, in ``before_request``), the
token (401, the :func:`~gateway_app.auth.require_jwt` decorator), then the service (404, 503),
the body size (413), and the upstream.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, current_app, g, request
from werkzeug.routing import BaseConverter, ValidationError
from werkzeug.wsgi import ClosingIterator

from . import transforms
from .auth import require_jwt
from .clients import client_address, in_networks
from .config import RateLimit
from .errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    NoHealthyInstance,
    PayloadTooLarge,
    RateLimited,
    ServiceNotFound,
    Unauthorized,
    error_response,
)
from .forwarding import (
    CHUNK_SIZE,
    GATEWAY_OWNED,
    HOP_BY_HOP,
    BodyReader,
    dropped_headers,
    read_upto,
    release,
    stream_body,
)
from .health import FAILURE_STATUSES
from .policies import DEFAULT_POLICY, Policy
from .ratelimit import Decision
from .registry import Instance, Service
from .retries import IDEMPOTENT_METHODS, MAX_RETRIES, REPLAYABLE_BODY_BYTES
from .validation import NAME_RE, RESERVED_NAMES, has_dot_segment

#: The methods forwarded; anything else gets 405 from routing.
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: Request headers never forwarded: hop-by-hop, gateway-owned, and ``Expect`` (the gateway
#: answers ``100-continue`` itself).
_DROPPED = HOP_BY_HOP | GATEWAY_OWNED | {"expect"}
_TARGET_RE = re.compile(r"^/[\x21-\x7e]*$")
#: Response bodies of known length up to this size are read whole, then sent.
SMALL_BODY_BYTES = CHUNK_SIZE
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

log = logging.getLogger("gateway.proxy")
bp = Blueprint("proxy", __name__)


class ServiceNameConverter(BaseConverter):
    """A first path segment that is not one of the gateway's own names."""

    regex = "[^/]+"

    def to_python(self, value: str) -> str:
        if value in RESERVED_NAMES:
            raise ValidationError()
        return value


class RestConverter(BaseConverter):
    """Anything after ``/NAME/``, empty included (the raw URI is what gets forwarded)."""

    regex = ".*"
    part_isolating = False


class PassthroughResponse(Response):
    """A response that adds nothing: no default Content-Type on an upstream that sent none."""

    default_mimetype = None


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


def request_id() -> str:
    """The request's id: the client's when it is sane, else a new one."""
    incoming = request.environ.get("HTTP_X_REQUEST_ID")
    if incoming and _SANE_REQUEST_ID.match(incoming):
        return incoming
    return _request_ids.new()


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


@bp.before_request
def parse_target() -> None:
    """Refuse malformed paths (400) before anything else, and find the service's policy."""
    target = raw_target(request.environ)
    path, sep, query = target.partition("?")
    if not _TARGET_RE.match(target) or has_dot_segment(path) or "#" in target:
        raise BadRequest("malformed request path")
    name, slash, rest = path[1:].partition("/")
    policy = current_app.extensions["gateway"].registry.snapshot().policies.get(
        name, DEFAULT_POLICY)
    ctx = g._get_current_object()  # type: ignore[attr-defined]  # one context lookup
    ctx.service_name = name
    ctx.upstream_target = (path if not policy.strip_prefix else slash + rest, sep + query)
    ctx.policy = policy
    ctx.public = policy.public


@bp.errorhandler(Unauthorized)
def count_refused_token(exc: Unauthorized) -> Response:
    """A request refused for its token still counts against its client address's limit
    (an error handler: it costs nothing on the way of a good request)."""
    response = error_response(401, exc.error, exc.description or "", exc.extra_headers)
    gw = current_app.extensions["gateway"]
    limit = _limit_for(gw.settings, g.policy)
    if limit is not None:
        client = client_address(request.environ, gw.settings.trusted_proxies)
        response.headers.update(_take(gw, g.policy, g.service_name, client, limit).headers())
    return response


@bp.route("/<service:name>", methods=METHODS, provide_automatic_options=False)
@bp.route("/<service:name>/<rest:rest>", methods=METHODS, provide_automatic_options=False)
@require_jwt
def proxy(name: str, rest: str | None = None) -> Response:
    gw = current_app.extensions["gateway"]
    settings = gw.settings
    ctx = g._get_current_object()  # type: ignore[attr-defined]  # one lookup of each
    req = request._get_current_object()  # type: ignore[attr-defined]
    policy: Policy = ctx.policy
    environ = req.environ
    service = gw.registry.snapshot().services.get(name) if NAME_RE.match(name) else None
    if service is None:
        raise ServiceNotFound(f"no service named {name!r}")

    body, length = _request_body(environ, settings.max_body_bytes)
    limit = _limit_for(settings, policy)
    if limit is not None:
        claims = ctx.get("claims")
        subject = claims.get("sub") if claims else None
        client = subject or client_address(environ, settings.trusted_proxies)
        decision = _take(gw, policy, name, client, limit)
        ctx.extra_headers = decision.headers()
        if not decision.allowed:
            raise RateLimited(f"rate limit of {limit.limit} requests per "
                              f"{_PERIOD_NAMES[limit.period]} exceeded")

    upstream, instance = _send_with_retries(gw, ctx, req, service, policy, body, length)
    health = gw.registry.health
    if upstream.status_code in FAILURE_STATUSES:
        health.failed(instance.health, time.time(), f"status {upstream.status_code}")
    else:
        health.succeeded(instance.health, time.time())

    def finished() -> None:
        health.finished(instance.health)
        release(upstream)

    response_headers = _response_headers(upstream.headers)
    description = f"{instance.origin} ({name})"
    body_iter: Any = None
    if policy.transforms_response:
        response_headers = transforms.response_headers(response_headers, policy)
        if policy.json_add:
            try:
                body_iter = transforms.json_body(upstream, response_headers, policy,
                                                 req.method, description)
            except GatewayError:  # the upstream failed mid-body, before any header went out
                finished()
                raise
    if body_iter is None:
        remaining = upstream.raw.length_remaining  # by Content-Length; None when unknown
        if remaining is not None and remaining <= SMALL_BODY_BYTES:
            # A small body of known length is read whole before answering (nginx's proxy
            # buffering does the same): the upstream connection is back in the pool before
            # the client is written to, and a body cut short is still a 502, not a cut
            # connection.
            try:
                data = read_upto(upstream, remaining, description)
            finally:
                finished()
            # (Not passed through: werkzeug then runs the response's close callbacks.)
            return PassthroughResponse([data], status=upstream.status_code,
                                       headers=response_headers)
        body_iter = stream_body(upstream, description)
    # With direct_passthrough, werkzeug hands this iterable to the server as it is: its close()
    # (called by the server when done, or when the client went away) must release the upstream.
    return PassthroughResponse(
        ClosingIterator(body_iter, finished),
        status=upstream.status_code,
        headers=response_headers,
        direct_passthrough=True,
    )


def _send_with_retries(gw: Any, ctx: Any, req: Any, service: Service, policy: Policy,
                       body: Any, length: str | None) -> tuple[Any, Instance]:
    """Choose an instance and send; on a failure that allows it, try another (see retries).
    ``ctx`` and ``req`` are the request's ``g`` and ``request``."""
    settings = gw.settings
    environ = req.environ
    method = req.method
    idempotent = method in IDEMPOTENT_METHODS or "HTTP_IDEMPOTENCY_KEY" in environ
    if isinstance(body, BodyReader) and length is not None \
            and int(length) <= REPLAYABLE_BODY_BYTES:
        body = body.read_all()  # small: kept, so it can be sent again
    connect_timeout = policy.connect_timeout or settings.connect_timeout
    read_timeout = policy.read_timeout or settings.read_timeout
    deadline = time.monotonic() + connect_timeout + read_timeout
    path, query = ctx.upstream_target
    health = gw.registry.health
    tried: set[str] = set()
    failure: GatewayError | None = None
    gw.retries.request()
    while True:
        instance = service.choose(gw.registry.now(), frozenset(tried))
        if instance is None:
            if failure is not None:
                raise failure
            raise NoHealthyInstance(f"service {service.name!r} has no instance that can take "
                                    "traffic")
        headers = _upstream_headers(environ, ctx, instance, service.name,
                                    settings.trusted_proxies)
        if length is not None:
            headers["Content-Length"] = length
        if policy.request_remove or policy.request_add:
            transforms.apply_request_headers(headers, policy)
        ctx.instance = instance
        health.started(instance.health)
        started = time.perf_counter()
        try:
            upstream = gw.forwarder.send(
                instance, method, (instance.base_path + path or "/") + query, headers, body,
                connect_timeout, max(0.01, min(read_timeout, deadline - time.monotonic())),
            )
        except (BadGateway, GatewayTimeout) as exc:
            health.finished(instance.health)
            health.failed(instance.health, time.time(), exc.error)
            unsent = exc.safe_to_retry and (not isinstance(body, BodyReader) or body.sent == 0)
            replayable = idempotent and not isinstance(body, BodyReader)
            if (len(tried) < MAX_RETRIES and (unsent or replayable)
                    and deadline - time.monotonic() > 0.05 and gw.retries.try_retry()):
                log.info("retrying %s %s on another instance after: %s", method,
                         service.name, exc.description)
                tried.add(instance.id)
                failure = exc
                continue
            raise
        ctx.upstream_ms = (time.perf_counter() - started) * 1000
        return upstream, instance


_PERIOD_NAMES = {1.0: "second", 60.0: "minute", 3600.0: "hour"}


def _limit_for(settings: Any, policy: Policy) -> RateLimit | None:
    """The service's own limit, else the global one; ``None`` when unlimited."""
    if policy.rate_limit is False:
        return None
    return policy.rate_limit or settings.rate_limit  # type: ignore[return-value]


def _take(gw: Any, policy: Policy, name: str, client: str, limit: RateLimit) -> Decision:
    """One token from the client's bucket: per service when it has its own limit."""
    scope = name if policy.rate_limit else "*"
    return gw.limiter.take(f"{scope}\x00{client}", limit)


def _request_body(environ: dict[str, Any], limit: int) -> tuple[BodyReader | None, str | None]:
    """The body to send up and its Content-Length (chunked when ``None`` with a body);
    413 when declared too large."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        if not length.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(length) > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        if int(length) == 0:
            return None, "0"
        return BodyReader(environ["wsgi.input"], limit), str(int(length))
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return BodyReader(environ["wsgi.input"], limit), None
    return None, None


def _upstream_headers(environ: dict[str, Any], ctx: Any, instance: Any, name: str,
                      trusted: Any) -> dict[str, str]:
    dropped = dropped_headers(_DROPPED, environ.get("HTTP_CONNECTION"))
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            header = key[5:].replace("_", "-")
            if header.lower() not in dropped:
                headers[header.title()] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["Content-Type"] = content_type

    peer = environ.get("REMOTE_ADDR", "")
    from_proxy = bool(trusted) and in_networks(peer, trusted)
    incoming_xff = environ.get("HTTP_X_FORWARDED_FOR")
    headers["Host"] = instance.origin.partition("://")[2]
    headers["X-Forwarded-For"] = f"{incoming_xff}, {peer}" if from_proxy and incoming_xff else peer
    proto = environ.get("HTTP_X_FORWARDED_PROTO", "").lower() if from_proxy else ""
    if proto not in ("http", "https"):
        proto = environ["wsgi.url_scheme"]
    headers["X-Forwarded-Proto"] = proto
    host = environ.get("HTTP_X_FORWARDED_HOST") if from_proxy else None
    headers["X-Forwarded-Host"] = host or environ.get("HTTP_HOST", "")
    headers["X-Forwarded-Prefix"] = "/" + name
    headers["X-Request-ID"] = ctx.request_id
    claims = ctx.get("claims")
    if claims is not None and claims.get("sub") is not None:
        headers["X-Authenticated-Subject"] = claims["sub"]
    return headers


def _response_headers(upstream_headers: Any) -> list[tuple[str, str]]:
    dropped = dropped_headers(HOP_BY_HOP, upstream_headers.get("Connection"))
    return [(k, v) for k, v in upstream_headers.items() if k.lower() not in dropped]
