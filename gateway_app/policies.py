"""Per-service policies: validation of what an operator sends, and the compiled form the hot
path reads.

A policy is stored as the validated JSON document (every field present, defaults filled in)
and compiled once per registry snapshot into a :class:`Policy`, so a proxied request only
reads attributes.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from .authorization import (
    ClaimHeaders,
    Requirement,
    validate_claims_to_headers,
    validate_require,
)
from .errors import BadRequest
from .headers import GATEWAY_OWNED, HOP_BY_HOP
from .ratelimit import RateLimit, RateLimitError, parse_rate_limit
from .settings import STRATEGIES
from .validation import check_json_value, has_dot_segment

log = logging.getLogger("gateway.policies")

#: Response headers the gateway owns: a policy may neither add nor remove them.
GATEWAY_OWNED_RESPONSE = frozenset({
    "x-request-id", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "retry-after",
    "content-length",
})
#: JSON bodies larger than this are passed through untransformed.
MAX_JSON_TRANSFORM_BYTES = 1024 * 1024
MAX_HEADER_VALUE = 4096
MAX_HEADER_ENTRIES = 32
MAX_JSON_ADD_BYTES = 16 * 1024
#: ``response_json.add`` nests this deep at most (the ``add`` object itself is one level).
MAX_JSON_ADD_DEPTH = 16
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_FIELDS = ("strip_prefix", "connect_timeout", "read_timeout", "rate_limit", "auth",
           "request_headers", "response_headers", "response_json", "balancing", "health_check",
           "require", "claims_to_headers")
#: Active health check fields: (default, low, high).
_CHECK_FIELDS = {
    "interval": (10.0, 0.1, 3600.0),
    "timeout": (2.0, 0.05, 60.0),
    "healthy_threshold": (2, 1, 100),
    "unhealthy_threshold": (2, 1, 100),
}
_CHECK_PATH_RE = re.compile(r"^/[\x21-\x7e]{0,1023}$")


@dataclass(frozen=True)
class Policy:
    """A service's policy, ready for the hot path."""

    strip_prefix: bool = True
    connect_timeout: float | None = None
    read_timeout: float | None = None
    #: ``None``: the global limit applies; ``False``: no limit for this service.
    rate_limit: RateLimit | None | bool = None
    public: bool = False
    request_add: tuple[tuple[str, str], ...] = ()
    request_remove: frozenset[str] = frozenset()
    response_add: tuple[tuple[str, str], ...] = ()
    response_remove: frozenset[str] = frozenset()
    json_add: dict[str, Any] = field(default_factory=dict)
    #: ``None``: the gateway's default strategy.
    balancing: str | None = None
    health_check: dict[str, Any] | None = None
    #: What a token must carry (scopes, claim values); ``None``: any valid token.
    require: Requirement | None = None
    #: Claims passed up as request headers; ``None``: none.
    claim_headers: ClaimHeaders | None = None

    @property
    def transforms_response(self) -> bool:
        return bool(self.response_add or self.response_remove or self.json_add)


DEFAULT_POLICY = Policy()


def _number(doc: dict[str, Any], key: str, high: float) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number of seconds or null")
    if not 0.01 <= value <= high:  # NaN fails it too (math.isfinite overflows on a huge int)
        raise BadRequest(f"{key} must be between 0.01 and {high} seconds")
    return float(value)


def _headers(doc: dict[str, Any], key: str, owned: frozenset[str]) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {"add": {}, "remove": []}
    if not isinstance(value, dict) or set(value) - {"add", "remove"}:
        raise BadRequest(f"{key} must be an object with 'add' and/or 'remove'")
    add = value.get("add") or {}
    remove = value.get("remove") or []
    if not isinstance(add, dict) or not isinstance(remove, list):
        raise BadRequest(f"{key}.add must be an object and {key}.remove a list")
    if len(add) > MAX_HEADER_ENTRIES or len(remove) > MAX_HEADER_ENTRIES:
        raise BadRequest(f"{key} may name at most {MAX_HEADER_ENTRIES} headers each way")
    for name in [*add, *remove]:
        if not isinstance(name, str) or not _TOKEN_RE.match(name):
            raise BadRequest(f"{key}: {name!r} is not a valid header name")
        if name.lower() in owned or name.lower() in HOP_BY_HOP:
            raise BadRequest(f"{key}: {name!r} is set by the gateway and cannot be changed")
    for name, text in add.items():
        if not isinstance(text, str) or len(text) > MAX_HEADER_VALUE or any(
            ord(c) < 32 and c != "\t" or ord(c) == 127 or ord(c) > 255 for c in text
        ):
            raise BadRequest(f"{key}.add[{name!r}] must be a header value (printable, "
                             f"at most {MAX_HEADER_VALUE} characters)")
    return {"add": dict(add), "remove": list(remove)}


def _health_check(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"path", *_CHECK_FIELDS}:
        raise BadRequest("health_check must be an object with path, interval, timeout, "
                         "healthy_threshold, unhealthy_threshold")
    path = value.get("path", "/")
    if not isinstance(path, str) or not _CHECK_PATH_RE.match(path) or has_dot_segment(path):
        raise BadRequest("health_check.path must be an absolute path like '/health'")
    check: dict[str, Any] = {"path": path}
    for key, (default, low, high) in _CHECK_FIELDS.items():
        number = value.get(key, default)
        whole = isinstance(default, int)
        if isinstance(number, bool) or not isinstance(number, int if whole else int | float) \
                or not low <= number <= high:
            raise BadRequest(f"health_check.{key} must be a {'whole ' if whole else ''}number "
                             f"from {low} to {high}")
        check[key] = number
    if check["timeout"] >= check["interval"]:
        raise BadRequest("health_check.timeout must be shorter than its interval")
    return check


def validate_policy(doc: object) -> dict[str, Any]:
    """The stored form of a policy document, or :class:`BadRequest` saying what is wrong."""
    if not isinstance(doc, dict):
        raise BadRequest("the policy must be a JSON object")
    unknown = set(doc) - set(_FIELDS)
    if unknown:
        raise BadRequest(f"unknown policy fields: {', '.join(sorted(unknown))}")
    strip_prefix = doc.get("strip_prefix", True)
    if not isinstance(strip_prefix, bool):
        raise BadRequest("strip_prefix must be true or false")
    rate_limit = doc.get("rate_limit")
    if rate_limit is not None:
        if not isinstance(rate_limit, str):
            raise BadRequest("rate_limit must be a string like '100/second' or 'off', or null")
        if rate_limit != "off":
            try:
                parse_rate_limit(rate_limit)
            except RateLimitError as exc:
                raise BadRequest(str(exc)) from None
    auth = doc.get("auth", "jwt")
    if auth not in ("jwt", "none"):
        raise BadRequest("auth must be 'jwt' or 'none'")
    response_json = doc.get("response_json") or {}
    if not isinstance(response_json, dict) or set(response_json) - {"add"}:
        raise BadRequest("response_json must be an object with 'add'")
    json_add = response_json.get("add") or {}
    if not isinstance(json_add, dict):
        raise BadRequest("response_json.add must be an object")
    check_json_value(json_add, "response_json.add", MAX_JSON_ADD_DEPTH)
    if len(json.dumps(json_add)) > MAX_JSON_ADD_BYTES:
        raise BadRequest(f"response_json.add must be at most {MAX_JSON_ADD_BYTES} bytes")
    balancing = doc.get("balancing")
    if balancing is not None and balancing not in STRATEGIES:
        raise BadRequest(f"balancing must be one of {', '.join(STRATEGIES)}")
    request_headers = _headers(doc, "request_headers", GATEWAY_OWNED)
    require = validate_require(doc.get("require"))
    claims_to_headers = validate_claims_to_headers(doc.get("claims_to_headers"), request_headers)
    if auth == "none" and (require or claims_to_headers):
        raise BadRequest("require and claims_to_headers need a token: they cannot go with "
                         "auth 'none'")
    return {
        "balancing": balancing,
        "health_check": _health_check(doc.get("health_check")),
        "strip_prefix": strip_prefix,
        "connect_timeout": _number(doc, "connect_timeout", 600),
        "read_timeout": _number(doc, "read_timeout", 3600),
        "rate_limit": rate_limit,
        "auth": auth,
        "request_headers": request_headers,
        "response_headers": _headers(doc, "response_headers", GATEWAY_OWNED_RESPONSE),
        "response_json": {"add": json_add},
        "require": require,
        "claims_to_headers": claims_to_headers,
    }


def _stored_rate_limit(text: str | None) -> RateLimit | None | bool:
    if not text:
        return None
    if text == "off":
        return False
    try:
        return parse_rate_limit(text)
    except RateLimitError as exc:
        # Stored before MAX_RATE_LIMIT existed (it then made every request a 500): the
        # gateway-wide limit applies instead, and the registry still loads.
        log.warning("a stored policy's rate limit is ignored: %s", exc)
        return None


def compile_policy(stored: dict[str, Any]) -> Policy:
    """The hot-path form of a stored (already validated) policy."""
    request_headers = stored.get("request_headers") or {}
    response_headers = stored.get("response_headers") or {}
    return Policy(
        strip_prefix=stored.get("strip_prefix", True),
        connect_timeout=stored.get("connect_timeout"),
        read_timeout=stored.get("read_timeout"),
        rate_limit=_stored_rate_limit(stored.get("rate_limit")),
        public=stored.get("auth") == "none",
        request_add=tuple((request_headers.get("add") or {}).items()),
        request_remove=frozenset(h.lower() for h in request_headers.get("remove") or ()),
        response_add=tuple((response_headers.get("add") or {}).items()),
        response_remove=frozenset(h.lower() for h in response_headers.get("remove") or ()),
        json_add=dict((stored.get("response_json") or {}).get("add") or {}),
        balancing=stored.get("balancing"),
        health_check=stored.get("health_check"),
        require=Requirement.compile(stored.get("require")),
        claim_headers=ClaimHeaders.compile(stored.get("claims_to_headers")),
    )
