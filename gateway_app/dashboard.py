"""The operators' dashboard: ``GET /_gateway/ui``, a page served by the gateway itself.

The page is a Jinja template with one stylesheet and one script, both under
``/_gateway/static/`` (no CDN, no build step). It holds no data: its script reads the
registry API (``/_gateway/services``, and each instance's ``/events`` where the gateway has
them), ``/_gateway/metrics`` where the gateway has it, and :func:`overview` below, every few
seconds, with the admin token from the browser session as a bearer token when one was given.

Access is the registry API's (:func:`gateway_app.admin_access.authorise`). A browser cannot send a
bearer token when it navigates, so a caller who is not on an admin network gets the page with
401 and a form for the token; the form keeps it in ``sessionStorage`` and the script sends it
with each request, where the API checks it as it checks any. A registration credential gets
403: it is for its own services' instances, not for the operators' view.

The static files are open to anyone, like ``/_gateway/health``: they are the same for every
gateway and carry nothing of its state.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, jsonify, render_template

from . import admin_access
from .errors import Unauthorized
from .health import EJECT_AFTER
from .timestamps import rfc3339

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/_gateway/static")

#: Seconds between the page's refreshes.
REFRESH_SECONDS = 2.0
#: The page's own rules: its script and stylesheet from this gateway only, and nothing inline.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
_EVENTS_RULE = re.compile(r"^/_gateway/services/<[^>]+>/instances/<[^>]+>/events$")


def features() -> dict[str, bool]:
    """What this gateway's API offers beyond the registry: the page asks only for these, so
    it never fetches an endpoint that is not there (a 404 is a console error in a browser)."""
    cached = current_app.extensions.get("gateway.dashboard.features")
    if cached is None:
        rules = [rule.rule for rule in current_app.url_map.iter_rules()]
        cached = {
            "metrics": "/_gateway/metrics" in rules,
            "events": any(_EVENTS_RULE.match(rule) for rule in rules),
        }
        current_app.extensions["gateway.dashboard.features"] = cached
    return cached


def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/_gateway/ui")
def page() -> tuple[Response, int]:
    """The page; with 401 and the token form for a caller who is not allowed yet."""
    status = 200
    try:
        admin_access.authorise()
    except Unauthorized:
        status = 401
    found = features()
    html = render_template("dashboard.html", locked=status == 401,
                           metrics_enabled=found["metrics"], events_enabled=found["events"],
                           refresh_ms=int(REFRESH_SECONDS * 1000))
    response = _headers(Response(html, status=status, mimetype="text/html"))
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
    return response, status


@bp.get("/_gateway/ui/overview")
def overview() -> Response:
    """What the page shows beside the registry and the metrics: this node, its store, the
    features the page may ask for, and the passive-health rule (for its explanations)."""
    admin_access.authorise()
    gw = current_app.extensions["gateway"]
    registry = gw.registry
    outage = registry.store_outage()
    # The scheme only: a store URL may carry a password.
    kind = urlsplit(gw.settings.store).scheme or "memory"
    store: dict[str, Any] = {
        "kind": kind,
        "up": outage is None,
        "down_since": rfc3339(outage[0]) if outage is not None else None,
        "error": (outage[1] or None) if outage is not None else None,
        "loaded": registry.snapshot().loaded,
    }
    return _headers(jsonify(
        node=gw.settings.node_id,
        ready=gw.not_ready_reason() is None,
        not_ready_reason=gw.not_ready_reason(),
        store=store,
        features=features(),
        eject_after=EJECT_AFTER,
        ejection_seconds=gw.settings.ejection_seconds,
        refresh_seconds=REFRESH_SECONDS,
    ))
