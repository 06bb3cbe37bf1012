"""Per-service authorization and claims passed up as headers: two policy fields.

``require`` names what a verified token must carry to reach the service::

    "require": {"scopes": ["orders:read"], "claims": {"role": ["admin", "ops"]}}

Every scope listed must be among the token's scopes (``scope``, space-delimited, and ``scp``,
a list or a space-delimited string, as Okta and Entra write it); every claim listed must have
one of the values listed (a claim that is a list needs one of its elements among them). The
requirements are all-of; a claim's values are any-of. A token that falls short gets 403
``forbidden`` with ``WWW-Authenticate: Bearer realm="gateway", error="insufficient_scope"``
(RFC 6750 section 3.1), and the upstream is not contacted.

``claims_to_headers`` maps claims to request headers for the upstream::

    "claims_to_headers": {"email": "X-User-Email", "tenant": "X-Tenant"}

A client's own copies of those headers are always dropped. A claim that is missing, or is not
a string or a number, or is longer than :data:`MAX_CLAIM_HEADER_CHARS`, or holds anything but
printable ASCII (CR and LF included), gives no header. Headers the gateway owns cannot be
targets.

Claim names are looked up as written first (``https://example.com/roles``, Auth0's namespaced
claims); a name with dots that is not a claim is then read as a path into nested objects
(``realm_access.roles``, Keycloak's realm roles).

Both are checked when a policy is PUT (a malformed one is a 400 that changes nothing) and
compiled once per registry snapshot, so a request reads a few attributes.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest
from .headers import GATEWAY_OWNED, HOP_BY_HOP

log = logging.getLogger("gateway.authorization")

MAX_REQUIRED_SCOPES = 32
MAX_REQUIRED_CLAIMS = 16
MAX_CLAIM_VALUES = 32
MAX_CLAIM_NAME_CHARS = 256
MAX_CLAIM_VALUE_CHARS = 256
#: A claim name read as a path has at most this many parts.
MAX_CLAIM_PATH = 8
MAX_CLAIM_HEADERS = 16
#: Longer claim values give no header.
MAX_CLAIM_HEADER_CHARS = 1024
#: Request headers a claim can never be written to, besides the gateway's own and hop-by-hop
#: ones: they change how the upstream reads the request or who it takes the caller for.
REFUSED_CLAIM_HEADERS = frozenset({
    "authorization", "cookie", "content-type", "content-encoding", "expect", "traceparent",
    "tracestate",
})
#: A scope-token (RFC 6749 section 3.3): no space, no quote, no backslash.
_SCOPE_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_HEADER_VALUE_RE = re.compile(r"^[\x20-\x7e]+$")
_MAX_INTEGER = 2**53 - 1
_MISSING = object()
#: A bad claim value for a header is logged at most this often (seconds).
_LOG_EVERY = 60.0
_last_log = [-_LOG_EVERY]

Tagged = tuple[str, Any]


def _tag(value: object) -> Tagged | None:
    """A claim value in a form that compares as JSON does (``true`` is not ``1``)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    return None


def _claim_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_CLAIM_NAME_CHARS \
            or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadRequest(f"{what}: claim names are 1 to {MAX_CLAIM_NAME_CHARS} characters "
                         "without control characters")
    if name.count(".") >= MAX_CLAIM_PATH:
        raise BadRequest(f"{what}: claim {name[:64]!r} has more than {MAX_CLAIM_PATH} parts")
    return name


def _path(name: str) -> tuple[str, ...] | None:
    """The parts of a dotted claim name, or ``None`` when it has no dot to split at."""
    parts = tuple(name.split("."))
    return parts if len(parts) > 1 and all(parts) else None


def claim_value(claims: dict[str, Any], name: str, path: tuple[str, ...] | None) -> Any:
    """The claim ``name``: as written, else (when it has dots) as a path into nested objects;
    ``None`` when absent."""
    value = claims.get(name, _MISSING)
    if value is not _MISSING:
        return value
    if path is None:
        return None
    value = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def token_scopes(claims: dict[str, Any]) -> set[str]:
    """The scopes a token carries: ``scope`` and ``scp``, each a space-delimited string or a
    list of strings."""
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(v for v in value if isinstance(v, str))
    return scopes


# -- require ----------------------------------------------------------------------------------


def validate_require(value: object) -> dict[str, Any] | None:
    """The stored form of ``require`` (``None`` when unset), or :class:`BadRequest`."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"scopes", "claims"}:
        raise BadRequest("require must be an object with 'scopes' and/or 'claims'")
    scopes = value.get("scopes", [])
    if not isinstance(scopes, list) or len(scopes) > MAX_REQUIRED_SCOPES \
            or not all(isinstance(s, str) and _SCOPE_RE.match(s) for s in scopes):
        raise BadRequest(f"require.scopes must be a list of at most {MAX_REQUIRED_SCOPES} "
                         "scopes, each 1 to 128 printable ASCII characters without space, "
                         "quote or backslash")
    claims = value.get("claims", {})
    if not isinstance(claims, dict) or len(claims) > MAX_REQUIRED_CLAIMS:
        raise BadRequest(f"require.claims must be an object of at most {MAX_REQUIRED_CLAIMS} "
                         "claims")
    for name, allowed in claims.items():
        _claim_name(name, "require.claims")
        if not isinstance(allowed, list) or not 1 <= len(allowed) <= MAX_CLAIM_VALUES:
            raise BadRequest(f"require.claims[{name[:64]!r}] must be a list of 1 to "
                             f"{MAX_CLAIM_VALUES} values, any of which will do")
        for item in allowed:
            if isinstance(item, str):
                ok = len(item) <= MAX_CLAIM_VALUE_CHARS
            elif isinstance(item, bool):
                ok = True
            elif isinstance(item, int):
                ok = -_MAX_INTEGER <= item <= _MAX_INTEGER
            elif isinstance(item, float):
                ok = math.isfinite(item)
            else:
                ok = False
            if not ok:
                raise BadRequest(f"require.claims[{name[:64]!r}]: values are strings (at most "
                                 f"{MAX_CLAIM_VALUE_CHARS} characters), numbers or booleans")
    return {"scopes": list(dict.fromkeys(scopes)), "claims": dict(claims)}


@dataclass(frozen=True)
class Requirement:
    """What a token must carry for a service: compiled from a policy's ``require``."""

    scopes: frozenset[str]
    #: (name, path, allowed values) per required claim.
    claims: tuple[tuple[str, tuple[str, ...] | None, frozenset[Tagged]], ...]
    #: The ``WWW-Authenticate`` challenge of a refusal.
    challenge: str

    @classmethod
    def compile(cls, stored: dict[str, Any] | None) -> Requirement | None:
        if not stored or not (stored.get("scopes") or stored.get("claims")):
            return None
        scopes = list(stored.get("scopes") or ())
        claims = tuple(
            (name, _path(name), frozenset(t for t in map(_tag, allowed) if t is not None))
            for name, allowed in (stored.get("claims") or {}).items()
        )
        challenge = 'Bearer realm="gateway", error="insufficient_scope"'
        if scopes:
            challenge += f', scope="{" ".join(scopes)}"'
        return cls(frozenset(scopes), claims, challenge)

    def refusal(self, claims: dict[str, Any]) -> str | None:
        """Why ``claims`` fall short (``None`` when they meet every requirement). Says which
        requirement failed, never what the token holds."""
        if self.scopes:
            missing = self.scopes - token_scopes(claims)
            if missing:
                return f"the token lacks the scope(s): {' '.join(sorted(missing))}"
        for name, path, allowed in self.claims:
            value = claim_value(claims, name, path)
            values = value if isinstance(value, list) else (value,)
            if not any(_tag(v) in allowed for v in values if not isinstance(v, dict | list)):
                return f"the token's {name[:64]!r} claim is not one the service accepts"
        return None


# -- claims_to_headers --------------------------------------------------------------------------


def validate_claims_to_headers(value: object, request_headers: dict[str, Any]) -> dict[str, str]:
    """The stored form of ``claims_to_headers`` (``{}`` when unset), or :class:`BadRequest`.
    ``request_headers`` is the policy's validated ``request_headers`` (a target may not also
    be added or removed there)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_CLAIM_HEADERS:
        raise BadRequest(f"claims_to_headers must be an object of at most {MAX_CLAIM_HEADERS} "
                         "claim names, each mapped to a header name")
    transformed = {h.lower() for h in [*request_headers.get("add", {}),
                                       *request_headers.get("remove", [])]}
    targets: set[str] = set()
    for name, header in value.items():
        _claim_name(name, "claims_to_headers")
        if not isinstance(header, str) or not _HEADER_NAME_RE.match(header):
            raise BadRequest(f"claims_to_headers[{name[:64]!r}]: {str(header)[:64]!r} is not a "
                             "valid header name")
        lower = header.lower()
        if lower in GATEWAY_OWNED or lower in HOP_BY_HOP or lower in REFUSED_CLAIM_HEADERS:
            raise BadRequest(f"claims_to_headers: {header!r} is set by the gateway or the "
                             "client's own, and cannot carry a claim")
        if lower in targets:
            raise BadRequest(f"claims_to_headers: {header!r} is the target of two claims")
        if lower in transformed:
            raise BadRequest(f"claims_to_headers: {header!r} is also in request_headers")
        targets.add(lower)
    return dict(value)


@dataclass(frozen=True)
class ClaimHeaders:
    """Compiled ``claims_to_headers``: (claim name, path, header) and the header names."""

    mapping: tuple[tuple[str, tuple[str, ...] | None, str], ...]
    #: Lower-cased: a client's own copies are dropped.
    names: frozenset[str]

    @classmethod
    def compile(cls, stored: dict[str, str] | None) -> ClaimHeaders | None:
        if not stored:
            return None
        mapping = tuple((name, _path(name), header) for name, header in stored.items())
        return cls(mapping, frozenset(header.lower() for _, _, header in mapping))

    def apply(self, headers: dict[str, str], claims: dict[str, Any] | None) -> None:
        """Set the headers the claims give (the client's copies were dropped before)."""
        if claims is None:
            return
        for name, path, header in self.mapping:
            value = claim_value(claims, name, path)
            if value is None:
                continue
            text = header_value(value)
            if text is None:
                _warn_unpassable(name, header)
                continue
            headers[header] = text


def header_value(value: object) -> str | None:
    """A claim as a header value: strings and finite numbers only, printable ASCII (no CR or
    LF), at most :data:`MAX_CLAIM_HEADER_CHARS`; ``None`` otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, int):
        if not -_MAX_INTEGER <= value <= _MAX_INTEGER:
            return None
        text = str(value)
    elif isinstance(value, float) and math.isfinite(value):
        text = repr(value)
    else:
        return None
    if len(text) > MAX_CLAIM_HEADER_CHARS or not _HEADER_VALUE_RE.match(text):
        return None
    return text


def _warn_unpassable(name: str, header: str) -> None:
    now = time.monotonic()
    if now - _last_log[0] >= _LOG_EVERY:
        _last_log[0] = now
        log.warning("claim %r cannot be passed as %s (not a string or number of printable "
                    "ASCII within %d characters): no header sent", name[:64], header,
                    MAX_CLAIM_HEADER_CHARS)
