"""The gateway's errors: one class per row of the status table in the README (Proxying).

Each error is a werkzeug :class:`~werkzeug.exceptions.HTTPException`, so Flask's machinery
knows its status, and carries the stable ``error`` code clients match on. App-level handlers
(:func:`register_error_handlers`) render every error, ours and werkzeug's routing ones, as JSON
``{"error", "message", "request_id"}``.
"""

from __future__ import annotations

import json

from flask import Flask, Response, g
from werkzeug.exceptions import HTTPException


class GatewayError(HTTPException):
    """Root of the gateway's errors."""

    code = 500
    error = "internal_error"
    description = "The gateway failed to handle the request."
    #: For upstream failures: nothing of the request reached the upstream (requests'
    #: ``ConnectTimeout`` is "safe to retry" in the same sense).
    safe_to_retry = False
    #: For upstream failures: what went wrong, in a word ("connect_refused", "timeout",
    #: "protocol"...), for logs, health checks and metrics; for a refused token, why
    #: ("missing", "expired"... see :class:`gateway_app.auth.InvalidToken`).
    kind = ""

    def __init__(self, message: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(description=message or self.description)
        self.extra_headers = headers or {}


class BadRequest(GatewayError):
    code, error = 400, "bad_request"
    description = "The request is malformed."


class Unauthorized(GatewayError):
    code, error = 401, "unauthorized"
    description = "A valid token is required."


class Forbidden(GatewayError):
    """A valid credential that does not allow this: a token without the scopes or claims the
    service's policy requires, a registration credential for another service."""

    code, error = 403, "forbidden"
    description = "The credential does not allow this."


class NotFound(GatewayError):
    code, error = 404, "not_found"
    description = "Nothing is here."


class ServiceNotFound(NotFound):
    error = "service_not_found"
    description = "No such service."


class InstanceNotFound(NotFound):
    error = "instance_not_found"
    description = "No such instance."


class PolicyNotFound(NotFound):
    error = "policy_not_found"
    description = "The service has no policy."


class RequestTimeout(GatewayError):
    """The client stopped sending its body (``GATEWAY_CLIENT_BODY_TIMEOUT`` between reads)."""

    code, error = 408, "request_timeout"
    description = "The request body did not arrive in time."


class PayloadTooLarge(GatewayError):
    code, error = 413, "payload_too_large"
    description = "The request body is too large."


class RateLimited(GatewayError):
    code, error = 429, "rate_limited"
    description = "Too many requests."


class BadGateway(GatewayError):
    """The upstream refused, reset, or spoke broken HTTP: the request may not have run."""

    code, error = 502, "bad_gateway"
    description = "The upstream service failed to answer."


class NoHealthyInstance(GatewayError):
    code, error = 503, "no_healthy_instance"
    description = "The service has no instance that can take traffic."


class StoreUnavailable(GatewayError):
    """The registry's store cannot take a write right now; nothing was changed."""

    code, error = 503, "store_unavailable"
    description = "The registry store is unavailable; try again."


class RegistryNotReady(GatewayError):
    """This worker has not loaded the registry yet (its store did not answer at start): it
    cannot tell whether the service exists, so it says neither yes nor no."""

    code, error = 503, "registry_not_ready"
    description = "The gateway has not loaded its registry yet; try again."


class GatewayTimeout(GatewayError):
    code, error = 504, "gateway_timeout"
    description = "The upstream service did not answer in time."


class UnsupportedTransferCoding(GatewayError):
    """A request body in a transfer coding other than ``chunked`` (RFC 9112 section 6.1)."""

    code, error = 501, "not_implemented"
    description = "The request's transfer coding is not supported."


class LoopDetected(GatewayError):
    """The request already passed through this gateway (its ``Via`` says so), or through
    too many gateways: forwarding it again would loop."""

    code, error = 508, "loop_detected"
    description = "The request has already passed through this gateway."


#: werkzeug's own errors (raised by routing) mapped onto our codes.
_WERKZEUG_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "bad_request",
    431: "bad_request",
}


def error_response(status: int, error: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    """A JSON error response in the gateway's shape."""
    view = g.get("view")
    request_id = view.request_id if view is not None else None
    body = json.dumps({"error": error, "message": message, "request_id": request_id})
    response = Response(body, status=status, mimetype="application/json")
    if request_id:
        response.headers["X-Request-ID"] = request_id
    if headers:
        response.headers.update(headers)
    return response


def _handle_http_exception(exc: HTTPException) -> Response:
    """Render ours and werkzeug's HTTP errors alike (one handler: Flask files handlers for an
    HTTPException subclass under its class's status code, which would miss our subclasses)."""
    if isinstance(exc, GatewayError):
        return error_response(exc.code or 500, exc.error, exc.description or "",
                              exc.extra_headers)
    code = exc.code or 500
    error = _WERKZEUG_CODES.get(code, "internal_error" if code >= 500 else "bad_request")
    headers = {}
    if code == 405:
        headers["Allow"] = ", ".join(getattr(exc, "valid_methods", None) or [])
    return error_response(code, error, exc.description or "", headers)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(HTTPException, _handle_http_exception)
