"""The registry API blueprint: the seed's ``/register_service`` and ``/deregister_service``,
and the REST forms under ``/_gateway/``.

Every route but ``/_gateway/health`` and ``/_gateway/ready`` (``/_gateway/metrics`` included)
is for operators and services only: the caller's address
must be in ``GATEWAY_ADMIN_ALLOW``, or it must present ``GATEWAY_ADMIN_TOKEN`` as a bearer
token, or a registration credential (:mod:`gateway_app.credentials`): that one allows
registering, renewing, draining, removing and reading instances of the services it names, from
any address, and answers 403 for anything else. Anyone else gets 401 and nothing changes.

Every write, allowed or refused, leaves an audit line (:mod:`gateway_app.audit`): who, from
where, what, and the result.
"""

from __future__ import annotations

import bisect
import time
from typing import Any, NoReturn

from flask import Blueprint, Response, current_app, g, jsonify, request

from . import audit
from .admin_access import allow, authorise
from .credentials import (
    ID_RE,
    MAX_REVOKED,
    MAX_TTL,
)
from .errors import (
    BadRequest,
    InstanceNotFound,
    PayloadTooLarge,
    PolicyNotFound,
    ServiceNotFound,
    StoreUnavailable,
)
from .front import is_own_address
from .policies import validate_policy
from .registry import Instance, Service
from .stores import InstanceRecord, StoreError
from .timestamps import rfc3339
from .validation import (
    NAME_RE,
    check_metadata,
    check_name,
    check_ttl,
    check_weight,
    instance_id,
    normalise_address,
    parse_json,
)

#: Registry request bodies larger than this get 413.
MAX_REGISTRY_BODY = 64 * 1024
#: Services per page of ``GET /_gateway/services``: without ``limit``, and at most.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: Methods whose calls are audited.
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})

bp = Blueprint("admin", __name__)

bp.before_request(authorise)


@bp.after_request
def audit_write(response: Response) -> Response:
    """One audit line per write, allowed or refused (never a token, a credential or a body)."""
    if request.method not in _WRITES:
        return response
    view = g.view
    args = request.view_args or {}
    fields = {"service": args.get("name"), "instance": args.get("instance"),
              "credential": args.get("credential")}
    fields.update(g.get("audit") or {})
    error = None
    if response.status_code >= 400:
        body = response.get_json(silent=True)
        error = body.get("error") if isinstance(body, dict) else None
    audit.record({
        **fields, "request_id": view.request_id, "actor": g.get("actor") or "anonymous",
        "client": view.client, "action": (request.endpoint or "").removeprefix("admin."),
        "status": response.status_code, "error": error,
    }, current_app.extensions["gateway"].settings.log_format)
    return response


# -- request bodies ------------------------------------------------------------------------


def _read_body() -> str:
    length = request.content_length
    if length is not None and length > MAX_REGISTRY_BODY:
        raise PayloadTooLarge(f"registry requests are limited to {MAX_REGISTRY_BODY} bytes")
    data = request.stream.read(MAX_REGISTRY_BODY + 1)
    if len(data) > MAX_REGISTRY_BODY:
        raise PayloadTooLarge(f"registry requests are limited to {MAX_REGISTRY_BODY} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body must be UTF-8 text") from None


def _parse_body(text: str) -> dict[str, Any] | tuple[str, str | None]:
    """JSON object when the body is JSON, else the seed's ``name[,address]`` as a tuple."""
    if request.mimetype == "application/json" or text.lstrip().startswith("{"):
        doc = parse_json(text)
        if not isinstance(doc, dict):
            raise BadRequest("the JSON body must be an object")
        return doc
    text = text.strip()
    if not text:
        raise BadRequest("the body is empty: send 'name,address' or JSON")
    name, comma, address = text.partition(",")
    return name.strip(), (address.strip() if comma else None)


def _instance_json(record: InstanceRecord) -> dict[str, Any]:
    gw = current_app.extensions["gateway"]
    now = gw.registry.now()
    instance = Instance(record)
    key = instance.health.key
    return instance.to_dict(now, gw.health.view([key], time.time()).get(key))


def _with_health(services: list[Service]) -> list[dict[str, Any]]:
    """Services as listed, with the health every worker shares (read from the board, so the
    answer is the same whichever worker gives it)."""
    gw = current_app.extensions["gateway"]
    keys = [i.health.key for s in services for i in s.instances]
    health = gw.health.view(keys, time.time())
    now = gw.registry.now()
    return [s.to_dict(now, health) for s in services]


# -- the seed's endpoints ------------------------------------------------------------------


@bp.post("/register_service")
def register() -> tuple[Response, int]:
    parsed = _parse_body(_read_body())
    gw = current_app.extensions["gateway"]
    deny = gw.settings.upstream_deny
    if isinstance(parsed, dict):
        name = check_name(parsed.get("name"))
        address = normalise_address(parsed.get("address"), deny)
        ttl = check_ttl(parsed.get("ttl"))
        weight = check_weight(parsed.get("weight"))
        metadata = check_metadata(parsed.get("metadata"))
    else:
        if parsed[1] is None:
            raise BadRequest("the body must be 'name,address'")
        name = check_name(parsed[0])
        address = normalise_address(parsed[1], deny)
        ttl, weight, metadata = None, 1, {}
    g.audit = {"service": name, "address": address, "instance": instance_id(address)}
    allow(name)
    if is_own_address(address, gw.settings.bind):
        raise BadRequest(f"address {address!r} is where this gateway listens: requests to it "
                         "would loop back into the gateway")
    record, created = gw.registry.register(name, address, ttl=ttl, weight=weight,
                                           metadata=metadata)
    return jsonify(name=name, instance=_instance_json(record)), 201 if created else 200


@bp.post("/deregister_service")
def deregister() -> Response:
    parsed = _parse_body(_read_body())
    if isinstance(parsed, dict):
        name, address = parsed.get("name"), parsed.get("address")
    else:
        name, address = parsed
    name = check_name(name)
    g.audit = {"service": name}
    allow(name)
    registry = current_app.extensions["gateway"].registry
    if address is None:
        removed = registry.remove_service(name)
        if not removed:
            raise ServiceNotFound(f"no service named {name!r}")
        return jsonify(name=name, removed=[_instance_json(r) for r in removed])
    address = normalise_address(address)
    g.audit.update(address=address, instance=instance_id(address))
    record = registry.remove_instance(name, instance_id(address))
    if record is None:
        _raise_missing(name)
    return jsonify(name=name, removed=[_instance_json(record)])


# -- /_gateway/ ------------------------------------------------------------------------------


@bp.get("/_gateway/health")
def health() -> Response:
    """Liveness: the worker answers. Never touches the store or an upstream."""
    return jsonify(status="ok")


@bp.get("/_gateway/ready")
def ready() -> tuple[Response, int]:
    """Readiness of the worker that answers: 200 once it has loaded the registry, 503 with the
    reason before that and from the moment it begins to stop."""
    reason = current_app.extensions["gateway"].not_ready_reason()
    if reason is None:
        return jsonify(status="ready"), 200
    return jsonify(status="not_ready", reason=reason), 503


@bp.get("/_gateway/metrics")
def metrics() -> Response:
    """Every worker's metrics in Prometheus text format (OpenMetrics when asked for)."""
    body, content_type = current_app.extensions["gateway"].metrics.render(
        request.headers.get("Accept"))
    return Response(body, content_type=content_type)


@bp.get("/_gateway/services")
def list_services() -> Response:
    """One page of services in name order: ``?limit=`` (1 to :data:`MAX_PAGE`, default
    :data:`DEFAULT_PAGE`) after the name ``?after=``; ``next`` is the cursor for the next
    page, ``null`` on the last."""
    limit_text = request.args.get("limit")
    limit = DEFAULT_PAGE
    if limit_text is not None:
        if not limit_text.isascii() or not limit_text.isdigit() \
                or not 1 <= int(limit_text) <= MAX_PAGE:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_PAGE}")
        limit = int(limit_text)
    after = request.args.get("after")
    if after is not None and not NAME_RE.match(after):
        raise BadRequest("after must be a service name (the 'next' of the previous page)")
    registry = current_app.extensions["gateway"].registry
    snapshot = registry.current()
    names = snapshot.names
    scope = g.get("scope")  # a registration credential reads its own services only
    if scope is not None:
        names = tuple(n for n in names if n in scope)
    start = bisect.bisect_right(names, after) if after is not None else 0
    page = names[start:start + limit]
    return jsonify(services=_with_health([snapshot.services[n] for n in page]),
                   next=page[-1] if start + limit < len(names) else None)


@bp.get("/_gateway/services/<name>")
def get_service(name: str) -> Response:
    registry = current_app.extensions["gateway"].registry
    service = registry.current().services.get(name)
    if service is None:
        raise ServiceNotFound(f"no service named {name!r}")
    return jsonify(_with_health([service])[0])


@bp.get("/_gateway/services/<name>/instances/<instance>/events")
def instance_events(name: str, instance: str) -> Response:
    """The instance's timeline: its last transitions (at least 50), oldest first, as
    ``{"events": [{"time", "node", "worker", "cause", "value", "kind"}, ...]}``."""
    gw = current_app.extensions["gateway"]
    service = gw.registry.current().services.get(name)
    if service is None:
        raise ServiceNotFound(f"no service named {name!r}")
    if not any(i.id == instance for i in service.instances):
        raise InstanceNotFound(f"service {name!r} has no such instance")
    try:
        events = gw.health.events(name, instance)
    except StoreError as exc:
        raise StoreUnavailable(f"the health board is unavailable: {exc}") from exc
    return jsonify(events=events)


@bp.delete("/_gateway/services/<name>")
def delete_service(name: str) -> Response:
    removed = current_app.extensions["gateway"].registry.remove_service(name) \
        if NAME_RE.match(name) else []
    if not removed:
        raise ServiceNotFound(f"no service named {name!r}")
    return jsonify(name=name, instances=[_instance_json(r) for r in removed])


def _raise_missing(name: str) -> NoReturn:
    if name in current_app.extensions["gateway"].registry.current().services:
        raise InstanceNotFound(f"service {name!r} has no such instance")
    raise ServiceNotFound(f"no service named {name!r}")


def _instance_write(name: str, instance: str, action: str) -> Response:
    registry = current_app.extensions["gateway"].registry
    record = getattr(registry, action)(name, instance) if NAME_RE.match(name) else None
    if record is None:
        _raise_missing(name)
    return jsonify(_instance_json(record))


@bp.delete("/_gateway/services/<name>/instances/<instance>")
def delete_instance(name: str, instance: str) -> Response:
    return _instance_write(name, instance, "remove_instance")


@bp.put("/_gateway/services/<name>/instances/<instance>/heartbeat")
def heartbeat(name: str, instance: str) -> Response:
    return _instance_write(name, instance, "heartbeat")


@bp.put("/_gateway/services/<name>/instances/<instance>/drain")
def drain(name: str, instance: str) -> Response:
    return _instance_write(name, instance, "drain")


@bp.delete("/_gateway/services/<name>/instances/<instance>/drain")
def undrain(name: str, instance: str) -> Response:
    """Undo a drain: the instance takes new traffic again (harmless when not draining)."""
    return _instance_write(name, instance, "undrain")


# -- policies ------------------------------------------------------------------------------
# A policy belongs to a service name, not to its instances: it may be set before any instance
# registers and outlives the last one.


@bp.get("/_gateway/services/<name>/policy")
def get_policy(name: str) -> Response:
    doc = current_app.extensions["gateway"].registry.current().policy_docs.get(name)
    if doc is None:
        raise PolicyNotFound(f"service {name!r} has no policy")
    return jsonify(doc)


@bp.put("/_gateway/services/<name>/policy")
def put_policy(name: str) -> tuple[Response, int]:
    name = check_name(name)
    stored = validate_policy(parse_json(_read_body(), "the policy"))
    registry = current_app.extensions["gateway"].registry
    created = name not in registry.current().policy_docs
    registry.put_policy(name, stored)
    return jsonify(stored), 201 if created else 200


@bp.delete("/_gateway/services/<name>/policy")
def delete_policy(name: str) -> Response:
    registry = current_app.extensions["gateway"].registry
    if not NAME_RE.match(name) or not registry.delete_policy(name):
        raise PolicyNotFound(f"service {name!r} has no policy")
    return jsonify(name=name, deleted=True)


# -- registration credentials --------------------------------------------------------------
# Minted and revoked by operators only (a registration credential gets 403 here).


@bp.post("/_gateway/registration-tokens")
def mint_registration_token() -> tuple[Response, int]:
    """A new registration credential: ``{"services": [...], "ttl"?: s, "sub"?: "..."}``."""
    doc = parse_json(_read_body(), "the body")
    if not isinstance(doc, dict) or set(doc) - {"services", "ttl", "sub"}:
        raise BadRequest("the body must be an object with 'services', and optionally 'ttl' "
                         "and 'sub'")
    token, claims = current_app.extensions["gateway"].credentials.mint(
        doc.get("services"), doc.get("ttl"), doc.get("sub"))
    g.audit = {"credential": claims["jti"], "services": claims["services"]}
    return jsonify(token=token, id=claims["jti"], sub=claims["sub"],
                   services=claims["services"], expires_at=rfc3339(claims["exp"])), 201


@bp.delete("/_gateway/registration-tokens/<credential>")
def revoke_registration_token(credential: str) -> Response:
    """Revoke a credential by its id, on every worker and node within a second."""
    if not ID_RE.match(credential):
        raise BadRequest("a registration credential's id is 32 hex digits")
    until = time.time() + MAX_TTL  # its latest possible expiry (its own is not known here)
    try:
        current_app.extensions["gateway"].registry.revoke(credential, until, MAX_REVOKED)
    except ValueError as exc:
        raise BadRequest(f"{exc}; rotate the registration key instead") from None
    return jsonify(id=credential, revoked=True, until=rfc3339(until))


@bp.get("/_gateway/registration-tokens/revoked")
def list_revoked() -> Response:
    revoked = current_app.extensions["gateway"].registry.current().revoked
    now = time.time()
    return jsonify(revoked=[{"id": i, "until": rfc3339(u)}
                            for i, u in sorted(revoked.items()) if u >= now])
