"""The proxy blueprint: ``ANY /NAME[/REST]`` goes to an instance of service NAME.

The request arrives with its one view (:class:`~gateway_app.front.RequestView`), made at the
edge from the raw target; a malformed path or a loop was refused there (400, 508). Then, in
the order of the README's status table: the policy of the service segment as sent (in
``before_request``), the token (401, the :func:`~gateway_app.auth.require_jwt` decorator),
what the policy requires of it (403, the view's ``authorise``), the service (404), the body
size (413), the rate limit (429), and the upstream (502, 503, 504).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from werkzeug.routing import BaseConverter, ValidationError
from werkzeug.wsgi import ClosingIterator

from . import transforms
from .auth import require_jwt
from .errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    NoHealthyInstance,
    PayloadTooLarge,
    RateLimited,
    RegistryNotReady,
    ServiceNotFound,
    Unauthorized,
    error_response,
)
from .forwarding import CHUNK_SIZE, BodyReader, UpstreamAborted, open_body, read_upto, release
from .front import RequestView, traceparent, via_header
from .headers import GATEWAY_OWNED, HOP_BY_HOP, dropped_headers
from .health import FAILURE_STATUSES, failure_cause
from .policies import DEFAULT_POLICY, Policy
from .ratelimit import Decision, RateLimit, refused_credential_key
from .registry import Instance, Service
from .retries import REPLAYABLE_BODY_BYTES, is_idempotent, may_retry
from .transport import Deadline
from .validation import NAME_RE, RESERVED_NAMES

#: The methods forwarded; anything else gets 405 from routing.
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: Request headers never forwarded: hop-by-hop, gateway-owned, and ``Expect`` (the gateway
#: answers ``100-continue`` itself).
_DROPPED = HOP_BY_HOP | GATEWAY_OWNED | {"expect"}
#: Response bodies of known length up to this size are read whole, then sent.
SMALL_BODY_BYTES = CHUNK_SIZE

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
    """A response that adds nothing: no default Content-Type on an upstream that sent none,
    no Content-Length of its own (a HEAD answer's body is empty; its length is not 0)."""

    default_mimetype = None
    automatically_set_content_length = False


@bp.before_request
def find_policy() -> None:
    """The service's policy, for the service segment exactly as sent (public or not, its limit,
    its prefix handling): one snapshot read."""
    view = g.view
    snapshot = current_app.extensions["gateway"].registry.snapshot()
    if not snapshot.loaded:  # a worker whose store has not answered yet: not a 404
        raise RegistryNotReady(headers={"Retry-After": "1"})
    policy = snapshot.policies.get(view.service, DEFAULT_POLICY)
    view.policy = policy
    view.public = policy.public


@bp.errorhandler(Unauthorized)
def count_refused_token(exc: Unauthorized) -> Response:
    """A request refused for its token counts against its client address: against the
    address's failure bucket (``GATEWAY_AUTH_FAILURE_LIMIT``) and its rate limit. When either
    is empty the answer is 429, not another 401, so a token sprayer is slowed down. (An error
    handler: it costs nothing on the way of a good request.)"""
    gw = current_app.extensions["gateway"]
    view = g.view
    gw.metrics.token_refused(exc.kind)
    headers = dict(exc.extra_headers)
    refusal: Decision | None = None
    failures = gw.settings.auth_failure_limit
    if failures is not None:
        decision = gw.limiter.take(refused_credential_key(view.client), failures)
        if not decision.allowed:
            refusal = decision
    limit = _limit_for(gw.settings, view.policy)
    if limit is not None:
        decision = _take(gw, view.policy, view.service, view.client, limit)
        headers.update(decision.headers())
        if not decision.allowed:
            refusal = decision
    if refusal is not None:
        gw.metrics.limited(view.service)
        headers.pop("WWW-Authenticate", None)  # not a challenge: come back later
        headers["Retry-After"] = str(refusal.retry_after)
        return error_response(429, RateLimited.error, "too many requests with a refused "
                              "token from this address", headers)
    return error_response(401, exc.error, exc.description or "", headers)


@bp.route("/<service:name>", methods=METHODS, provide_automatic_options=False)
@bp.route("/<service:name>/<rest:rest>", methods=METHODS, provide_automatic_options=False)
@require_jwt
def proxy(name: str, rest: str | None = None) -> Response:
    """(Authenticate: the decorator), authorise, route, limit, choose and forward, respond:
    each step reads the request's one view (``name`` is its service segment, as sent)."""
    gw = current_app.extensions["gateway"]
    view = g.view
    view.authorise()
    service = _route(gw, view)
    body = _request_body(view, request.environ, gw.settings.max_body_bytes)
    _limit(gw, view)
    upstream, instance = _send_with_retries(gw, view, service, body)
    return _respond(gw, view, upstream, instance)


def _route(gw: Any, view: RequestView) -> Service:
    """The service the request names, exactly as sent (404 otherwise)."""
    name = view.service
    service = gw.registry.snapshot().services.get(name) if NAME_RE.match(name) else None
    if service is None:
        raise ServiceNotFound(f"no service named {name!r}")
    return service


def _limit(gw: Any, view: RequestView) -> None:
    """One token from the client's bucket (the verified subject's, else the address's); 429
    when it is empty. The limit's headers go on the response either way."""
    limit = _limit_for(gw.settings, view.policy)
    if limit is None:
        return
    claims = view.claims
    subject = claims.get("sub") if claims else None
    decision = _take(gw, view.policy, view.service, subject or view.client, limit)
    view.extra_headers = decision.headers()
    if not decision.allowed:
        gw.metrics.limited(view.service)
        raise RateLimited(f"rate limit of {limit.limit} requests per "
                          f"{limit.period_name} exceeded")


def _respond(gw: Any, view: RequestView, upstream: Any, instance: Instance) -> Response:
    """The client's response: the upstream's status, headers and body, with the policy's
    transformations; the upstream connection is released when the body is done.

    Whatever is read before answering (a small body whole, a JSON body to transform, the first
    chunk of any other) is read here, within the exchange's deadline, so that a failure is
    still a JSON 502 or 504; after the answer starts, a failure cuts the connection. Whatever
    goes wrong before the response is handed over, the instance's count and the connection are
    released."""
    health = gw.health
    policy: Policy = view.policy
    if upstream.status_code in FAILURE_STATUSES:
        if health.failed(instance.health, time.time(), f"HTTP {upstream.status_code}"):
            gw.metrics.ejected(instance.service)
    else:
        health.succeeded(instance.health, time.time())
    released = False

    def finished() -> None:
        nonlocal released
        if not released:
            released = True
            health.finished(instance.health)
            release(upstream)

    try:
        response_headers = _response_headers(upstream.headers)
        body_iter: Any = None
        if policy.transforms_response:
            response_headers = transforms.response_headers(response_headers, policy)
            if policy.json_add:
                body_iter = transforms.json_body(upstream, response_headers, policy,
                                                 view.method)
        if body_iter is None:
            remaining = upstream.raw.length_remaining  # by Content-Length; None when unknown
            if remaining is not None and remaining <= SMALL_BODY_BYTES:
                # A small body of known length is read whole before answering (nginx's proxy
                # buffering does the same): the upstream connection is back in the pool before
                # the client is written to, and a body cut short is still a 502, not a cut
                # connection.
                data = read_upto(upstream, remaining)
                finished()
                # (Not passed through: werkzeug then runs the response's close callbacks.)
                return PassthroughResponse([data], status=upstream.status_code,
                                           headers=response_headers)
            body_iter = _count_aborts(open_body(upstream), gw.metrics, instance.service)
        # With direct_passthrough, werkzeug hands this iterable to the server as it is: its
        # close() (called by the server when done, or when the client went away) must release
        # the upstream.
        return PassthroughResponse(
            ClosingIterator(body_iter, finished),
            status=upstream.status_code,
            headers=response_headers,
            direct_passthrough=True,
        )
    except BaseException as exc:
        finished()
        if isinstance(exc, GatewayError) and exc.kind:  # the upstream failed mid-answer
            gw.metrics.upstream_failed(instance.service, exc.kind)
        raise


def _count_aborts(body: Any, metrics: Any, service: str) -> Any:
    """``body``, counting an upstream failure after the answer started (the connection is
    then cut)."""
    try:
        yield from body
    except UpstreamAborted as exc:
        metrics.upstream_failed(service, exc.kind)
        raise


def _send_with_retries(gw: Any, view: RequestView, service: Service,
                       request_body: tuple[Any, str | None]) -> tuple[Any, Instance]:
    """Choose an instance and send; on a failure that allows it, try another (see retries).

    A failure of the client's own body (cut short, malformed, too large, too slow) is the
    client's: it is answered as such, and the instance is not blamed for it."""
    settings = gw.settings
    policy: Policy = view.policy
    body, length = request_body
    method = view.method
    environ = request.environ
    idempotent = is_idempotent(method, environ)
    if isinstance(body, BodyReader) and (length is None or int(length) <= REPLAYABLE_BODY_BYTES):
        # A small body (of either framing) is read before any upstream is contacted, as
        # nginx buffers: kept, it can be sent again, and a malformed one never goes up.
        whole = _client_side(view, lambda: body.buffer(REPLAYABLE_BODY_BYTES))
        if whole is not None:
            body, length = whole, str(len(whole))
    if isinstance(body, bytes):
        view.request_bytes = len(body)
    connect_timeout = policy.connect_timeout or settings.connect_timeout
    read_timeout = policy.read_timeout or settings.read_timeout
    # One deadline for the whole exchange, retries included (time spent waiting for the
    # client's body excepted); each connect, send and read ends by it.
    deadline = Deadline(settings.upstream_timeout or connect_timeout + read_timeout)
    if isinstance(body, BodyReader):
        body.deadline = deadline
    target = view.upstream_path()
    health = gw.health
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
        if failure is not None:  # a retry, on another instance
            gw.metrics.retried(service.name)
        headers = _upstream_headers(environ, view, instance, gw.pseudonym)
        if length is not None:
            headers["Content-Length"] = length
        if policy.request_remove or policy.request_add:
            transforms.apply_request_headers(headers, policy)
        view.instance = instance
        health.started(instance.health)
        started = time.perf_counter()
        try:
            upstream = gw.forwarder.send(
                instance, method, (instance.base_path + target or "/") + view.query, headers,
                body, connect_timeout, read_timeout, deadline,
            )
        except (BadGateway, GatewayTimeout) as exc:
            health.finished(instance.health)
            metrics = gw.metrics
            metrics.upstream_failed(service.name, exc.kind)
            if health.failed(instance.health, time.time(), failure_cause(exc)):
                metrics.ejected(service.name)
            streamed = body.sent if isinstance(body, BodyReader) else None
            if may_retry(exc.safe_to_retry, idempotent, streamed, len(tried),
                         deadline.remaining(), gw.retries):
                log.info("retrying %s %s on another instance after: %s", method,
                         service.name, exc.description)
                tried.add(instance.id)
                failure = exc
                continue
            raise
        except GatewayError:  # the client's body failed: not the instance's doing
            health.finished(instance.health)
            view.close_connection()
            raise
        view.upstream_ms = (time.perf_counter() - started) * 1000
        if isinstance(body, BodyReader):
            view.request_bytes = body.sent
        return upstream, instance


def _client_side(view: RequestView, read: Any) -> Any:
    """``read()``, closing the client's connection after the answer if its body failed."""
    try:
        return read()
    except GatewayError:
        view.close_connection()
        raise


def _limit_for(settings: Any, policy: Policy) -> RateLimit | None:
    """The service's own limit, else the global one; ``None`` when unlimited."""
    if policy.rate_limit is False:
        return None
    return policy.rate_limit or settings.rate_limit  # type: ignore[return-value]


def _take(gw: Any, policy: Policy, name: str, client: str, limit: RateLimit) -> Decision:
    """One token from the client's bucket: per service when it has its own limit."""
    scope = name if policy.rate_limit else "*"
    return gw.limiter.take(f"{scope}\x00{client}", limit)


def _request_body(view: RequestView, environ: dict[str, Any], limit: int
                  ) -> tuple[BodyReader | None, str | None]:
    """The body to send up and its Content-Length (chunked when ``None`` with a body);
    413 when declared too large."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        if not length.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(length) > limit:
            view.close_connection()  # the body is not read: the connection cannot go on
            raise PayloadTooLarge(f"request body over {limit} bytes")
        if int(length) == 0:
            return None, "0"
        return BodyReader(environ["wsgi.input"], limit, int(length)), str(int(length))
    if environ.get("HTTP_TRANSFER_ENCODING") is not None:  # chunked: the front door checked
        return BodyReader(environ["wsgi.input"], limit), None
    return None, None


def _upstream_headers(environ: dict[str, Any], view: RequestView, instance: Any,
                      pseudonym: str) -> dict[str, str]:
    """The headers sent up: the client's end-to-end ones, then the gateway's own, all from the
    request's view (the ``X-Forwarded-*`` of a trusted proxy only). Claims the policy passes
    up as headers replace the client's copies, which are dropped even when the claim is
    missing."""
    dropped = dropped_headers(_DROPPED, environ.get("HTTP_CONNECTION"))
    claim_headers = view.policy.claim_headers if view.policy is not None else None
    if claim_headers is not None:
        dropped = dropped | claim_headers.names
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            header = key[5:].replace("_", "-")
            if header.lower() not in dropped:
                headers[header.title()] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["Content-Type"] = content_type

    headers["Host"] = instance.origin.partition("://")[2]
    chain = view.forwarded_for
    headers["X-Forwarded-For"] = f"{chain}, {view.peer}" if chain else view.peer
    headers["X-Forwarded-Proto"] = view.scheme
    headers["X-Forwarded-Host"] = view.host
    headers["X-Forwarded-Prefix"] = "/" + view.service
    headers["X-Request-ID"] = view.request_id
    headers["Via"] = via_header(view, pseudonym)
    headers["traceparent"] = traceparent(view)
    if view.tracestate:
        headers["tracestate"] = view.tracestate
    claims = view.claims
    if claims is not None and claims.get("sub") is not None:
        headers["X-Authenticated-Subject"] = claims["sub"]
    if claim_headers is not None:
        claim_headers.apply(headers, claims)
    return headers


def _response_headers(upstream_headers: Any) -> list[tuple[str, str]]:
    dropped = dropped_headers(HOP_BY_HOP, upstream_headers.get("Connection"))
    return [(k, v) for k, v in upstream_headers.items() if k.lower() not in dropped]
