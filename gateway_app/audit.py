"""The audit log: one line for every write to the registry API (registrations, heartbeats,
drains, removals, policies, registration credentials minted and revoked), whether it was
allowed or not.

Each line says who (``admin token``, ``address 10.0.0.5``, ``registration <subject> <id>``,
or ``anonymous`` for a refused caller), from where, what (the action and its service,
instance, address or credential id), and the result (status and error code). It never holds
a token, a credential or a request body. Lines go to the ``gateway.audit`` logger: on stdout,
as text or JSON like the access log (``GATEWAY_LOG_FORMAT``), unless the application gave that
logger handlers of its own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from .timestamps import rfc3339

log = logging.getLogger("gateway.audit")
#: Text values made of these characters are written bare; others are JSON-quoted.
_BARE_RE = re.compile(r"^[A-Za-z0-9._:/@,+=-]{1,256}$")
#: The fields of a line, in order.
FIELDS = ("request_id", "actor", "client", "action", "service", "instance", "address",
          "credential", "services", "status", "error")


def configure() -> None:
    """Send audit lines to stdout, unless the application set up handlers for them."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def record(fields: dict[str, Any], log_format: str) -> None:
    """Write one audit line (fields that are ``None`` are left out)."""
    if not log.isEnabledFor(logging.INFO):
        return
    entry: dict[str, Any] = {"time": rfc3339(time.time()), "type": "audit"}
    entry.update((k, fields[k]) for k in FIELDS if fields.get(k) is not None)
    if log_format == "json":
        log.info("%s", json.dumps(entry, separators=(",", ":")))
        return
    parts = [entry.pop("time"), entry.pop("type")]
    for key, value in entry.items():
        text = ",".join(value) if isinstance(value, list | tuple) else str(value)
        parts.append(f"{key}={text if _BARE_RE.match(text) else json.dumps(text)}")
    log.info("%s", " ".join(parts))
