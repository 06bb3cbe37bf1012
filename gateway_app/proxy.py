"""The proxy blueprint: ``ANY /NAME[/REST]`` goes to an instance of service NAME.

Checks run in the order of SPEC section 5: a malformed path (400, in ``before_request``), the
token (401, the :func:`~gateway_app.auth.require_jwt` decorator), then the service (404, 503),
the body size (413), and the upstream.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, current_app, g, request
from werkzeug.routing import BaseConverter, ValidationError

from .auth import require_jwt
from .clients import in_networks
from .errors import BadRequest, NoHealthyInstance, PayloadTooLarge, ServiceNotFound
from .forwarding import (
    GATEWAY_OWNED,
    HOP_BY_HOP,
    BodyReader,
    connection_tokens,
    release,
    stream_body,
)
from .validation import NAME_RE, RESERVED_NAMES, has_dot_segment

#: The methods forwarded; anything else gets 405 from routing.
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: Request headers never forwarded: hop-by-hop, gateway-owned, and ``Expect`` (the gateway
#: answers ``100-continue`` itself).
_DROPPED = HOP_BY_HOP | GATEWAY_OWNED | {"expect"}
_TARGET_RE = re.compile(r"^/[\x21-\x7e]*$")
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

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


def request_id() -> str:
    """The request's id: the client's when it is sane, else a new one."""
    incoming = request.environ.get("HTTP_X_REQUEST_ID")
    if incoming and _SANE_REQUEST_ID.match(incoming):
        return incoming
    return os.urandom(16).hex()


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
    g.service_name = name
    g.upstream_target = (slash + rest, sep + query)
    policy = current_app.extensions["gateway"].registry.snapshot().policies.get(name)
    g.policy = policy
    g.public = bool(policy and policy.get("auth") == "none")


@bp.route("/<service:name>", methods=METHODS, provide_automatic_options=False)
@bp.route("/<service:name>/<rest:rest>", methods=METHODS, provide_automatic_options=False)
@require_jwt
def proxy(name: str, rest: str | None = None) -> Response:
    gw = current_app.extensions["gateway"]
    settings = gw.settings
    environ = request.environ
    service = gw.registry.snapshot().services.get(name) if NAME_RE.match(name) else None
    if service is None:
        raise ServiceNotFound(f"no service named {name!r}")

    body, length = _request_body(environ, settings.max_body_bytes)
    instance = service.choose(time.time())
    if instance is None:
        raise NoHealthyInstance(f"service {name!r} has no instance that can take traffic")

    path, query = g.upstream_target
    target = (instance.base_path + path or "/") + query
    headers = _upstream_headers(environ, instance, name, settings.trusted_proxies)
    if length is not None:
        headers["Content-Length"] = length

    upstream = gw.forwarder.send(
        instance, request.method, target, headers, body,
        settings.connect_timeout, settings.read_timeout,
    )
    g.instance = instance
    response = PassthroughResponse(
        stream_body(upstream, f"{instance.origin} ({name})"),
        status=upstream.status_code,
        headers=_response_headers(upstream.headers),
        direct_passthrough=True,
    )
    response.call_on_close(lambda: release(upstream))
    return response


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


def _upstream_headers(environ: dict[str, Any], instance: Any, name: str,
                      trusted: Any) -> dict[str, str]:
    dropped = _DROPPED | connection_tokens(environ.get("HTTP_CONNECTION"))
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
    headers["X-Request-ID"] = g.request_id
    claims = g.get("claims")
    if claims is not None and claims.get("sub") is not None:
        headers["X-Authenticated-Subject"] = claims["sub"]
    return headers


def _response_headers(upstream_headers: Any) -> list[tuple[str, str]]:
    dropped = HOP_BY_HOP | connection_tokens(upstream_headers.get("Connection"))
    return [(k, v) for k, v in upstream_headers.items() if k.lower() not in dropped]
