"""What the gateway's worker relies on in gunicorn, checked at boot: its version and the
internals of gthread it reaches into, and the settings it serves."""

from __future__ import annotations

from typing import Any

import gunicorn
from gunicorn import http
from gunicorn.workers import gthread
from gunicorn.workers.gthread import TConn, ThreadWorker

#: The gunicorn versions :class:`~gateway_app.workers.FrontDoorWorker` is written for and
#: tested with: at least the first, below the second (as in setup.cfg).
GUNICORN_VERSIONS = ((27, 0), (28, 0))
#: What of gunicorn it relies on, beyond its public worker interface; checked at boot.
RELIES_ON: dict[Any, tuple[str, ...]] = {
    ThreadWorker: ("enqueue_req", "finish_request", "handle", "handle_request",
                   "murder_keepalived", "on_client_socket_readable", "set_accept_enabled",
                   "wait_for_and_dispatch_events", "is_parent_alive", "_cap_keepalive"),
    TConn: ("init", "set_timeout", "close"),
    gthread: ("STOP_KEEPALIVE_LINGER",),
    http: ("get_parser",),
}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def unsupported_gunicorn(version: str | None = None) -> str | None:
    """Why the front-door worker cannot run on this gunicorn, or ``None`` when it can."""
    version = version or gunicorn.__version__
    low, high = GUNICORN_VERSIONS
    wanted = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
    if not low <= _version(version) < high:
        return (f"gunicorn {version} is installed, but the gateway's worker is written for and"
                f" tested with gunicorn{wanted} (setup.cfg); install a version in that range")
    missing = [f"{getattr(owner, '__name__', owner)}.{name}"
               for owner, names in RELIES_ON.items() for name in names
               if not hasattr(owner, name)]
    if missing:
        return (f"gunicorn {version} lacks what the gateway's worker relies on:"
                f" {', '.join(missing)}")
    return None


def unsupported_settings(cfg: Any) -> str | None:
    """Why the front-door worker cannot serve with these gunicorn settings, or ``None``."""
    if cfg.is_ssl:
        return ("TLS (certfile/keyfile) is not served by the gateway's worker, which reads"
                " request heads as plain HTTP/1.1; terminate TLS in front of it")
    if getattr(cfg, "protocol", "http") != "http":
        return f"protocol {cfg.protocol!r} is not served by the gateway's worker, only http"
    if getattr(cfg, "http2_cleartext", "off") in ("prior-knowledge", "both"):
        return ("HTTP/2 by prior knowledge (http2_cleartext) is not served by the gateway's"
                " worker, which reads request heads as HTTP/1.1")
    return None
