"""Who may call the registry API, the metrics and the dashboard: an admin-allowed client
address, the admin token, or a registration credential (for its own services only).

The rule itself is in :func:`authorise`; :mod:`gateway_app.admin` runs it before each of its
routes and :mod:`gateway_app.dashboard` before each of its own.
"""

from __future__ import annotations

import hmac

from flask import current_app, g, request

from .auth import bearer_token
from .client_address import in_networks
from .credentials import InvalidCredential
from .errors import Forbidden, RateLimited, Unauthorized
from .ratelimit import refused_credential_key

#: What a registration credential may do, for the services it names (the listing is filtered
#: to them); any other endpoint answers it 403.
REGISTRATION_ENDPOINTS = frozenset({
    "admin.register", "admin.deregister", "admin.list_services", "admin.get_service",
    "admin.delete_service", "admin.delete_instance", "admin.heartbeat", "admin.drain",
    "admin.undrain",
})
#: Routes open to anyone: liveness and readiness, for load balancers and orchestrators.
OPEN_ENDPOINTS = frozenset({"admin.health", "admin.ready"})


def authorise() -> None:
    """An admin-allowed client address, the admin token, or a registration credential (for
    its own services only: 403 otherwise); 401 otherwise. A request relayed for someone else
    (by the gateway itself, or by any proxy that is not a trusted one and says so in ``Via``
    or ``X-Forwarded-*``) never counts as coming from its relay's address."""
    g.actor = None
    g.scope = None  # the services a registration credential allows; None: all of them
    g.audit = {}
    if request.endpoint in OPEN_ENDPOINTS:
        return
    gw = current_app.extensions["gateway"]
    settings = gw.settings
    view = g.view
    if not view.relayed and in_networks(view.client, settings.admin_allow):
        g.actor = f"address {view.client}"
        return
    header = request.headers.get("Authorization", "")
    token = bearer_token(header)
    expected = settings.admin_token
    if (expected and token is not None
            and hmac.compare_digest(token.encode(), expected.encode())):
        g.actor = "admin token"
        return
    if token is not None and token.count(".") == 2:
        try:
            credential = gw.credentials.verify(token, gw.registry.current().revoked)
        except InvalidCredential:
            pass
        else:
            g.actor = f"registration {credential.subject} {credential.id}"
            g.scope = credential.services
            if request.endpoint not in REGISTRATION_ENDPOINTS:
                raise Forbidden("a registration credential may only register, renew, drain "
                                "and remove instances of its own services")
            name = (request.view_args or {}).get("name")
            if name is not None:
                allow(name)
            return
    if header and settings.auth_failure_limit is not None:
        # A wrong credential counts against the address, as a refused token does.
        decision = gw.limiter.take(refused_credential_key(view.client), settings.auth_failure_limit)
        if not decision.allowed:
            gw.metrics.limited(view.service)
            raise RateLimited("too many requests with a refused credential from this address",
                              headers={"Retry-After": str(decision.retry_after)})
    raise Unauthorized("the registry needs an allowed network, the admin token or a "
                       "registration credential",
                       headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'})


def allow(name: str) -> None:
    """403 unless the caller may act on service ``name`` (a registration credential names
    it; operators may act on any)."""
    scope = g.get("scope")
    if scope is not None and name not in scope:
        raise Forbidden(f"this registration credential is not for service {name[:64]!r}")
