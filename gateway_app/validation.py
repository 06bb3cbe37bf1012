"""Rules for what a caller may register: service names, addresses, ttl, weight, metadata, and
the JSON bodies of the registry API.

Everything here is pure: it takes text and returns a normalised value or raises
:class:`~gateway_app.errors.BadRequest` with a sentence saying what is wrong.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Iterable
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

from .addresses import Network, refused_range
from .errors import BadRequest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Paths the gateway owns; no service may take these names.
RESERVED_NAMES = frozenset({"_gateway", "register_service", "deregister_service"})
#: Host names that are aliases of cloud metadata endpoints.
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "instance-data"})
_HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$")
_NUMERICISH_RE = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?$")
#: Path segments are split at slashes and at backslashes (which some servers take as one).
_SEGMENT_SEPARATORS = re.compile(r"[/\\]")
#: Percent-decodings undone when looking for dot segments (``%252e`` is ``.`` after two).
_DECODE_ROUNDS = 3
_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_TTL = 86400
MAX_WEIGHT = 1000
MAX_METADATA_BYTES = 4096
#: Registry and policy bodies may nest arrays and objects this deep, no deeper.
MAX_JSON_DEPTH = 32
#: Integers in registry and policy bodies are within +-(2**53 - 1), the range every JSON reader
#: holds exactly (I-JSON, RFC 7493); other numbers must be finite.
MAX_JSON_INTEGER = 2**53 - 1
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


def check_name(name: object) -> str:
    """A valid, unreserved service name, or :class:`BadRequest`."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadRequest(
            "name must be 1 to 64 characters of letters, digits, '_', '.' or '-',"
            " starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise BadRequest(f"name {name!r} is reserved by the gateway")
    return name


def has_dot_segment(path: str) -> bool:
    """True when ``path`` holds a ``.`` or ``..`` segment in any spelling a server behind the
    gateway might take as one: percent-encoded (``%2e``, ``%2E%2e``, twice-encoded
    ``%252e``), ended by an encoded slash or a backslash (``..%2f``, ``..%5c``, ``..\\``), or
    with path parameters (``..;/``, as Tomcat reads it)."""
    if "." not in path and "%" not in path:  # the usual path: nothing to look at
        return False
    decoded = path
    for _ in range(_DECODE_ROUNDS):
        if "%" not in decoded:
            break
        once = unquote(decoded, errors="replace")
        if once == decoded:
            break
        decoded = once
    return any(segment.partition(";")[0] in (".", "..")
               for segment in _SEGMENT_SEPARATORS.split(decoded))


def _check_host(host: str, deny: Iterable[Network] = ()) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None:
        if _NUMERICISH_RE.match(host):
            # "2852039166" or "0251.0376.0251.0376" resolve to 169.254.169.254 through
            # inet_aton; only canonical dotted quads are accepted as numbers.
            raise BadRequest(f"address host {host!r} is not a canonical IP address")
        if not _HOST_RE.match(host) or len(host) > 253:
            raise BadRequest(f"address host {host!r} is not a valid host name")
        if host.rstrip(".") in _METADATA_HOSTS:
            raise BadRequest(f"address host {host!r} is a cloud metadata endpoint")
        return host.rstrip(".")
    why = refused_range(ip, deny)  # the same list every connection is checked against
    if why is not None:
        raise BadRequest(f"address host {host!r} is refused: {why}")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def normalise_address(address: object, deny: Iterable[Network] = ()) -> str:
    """Validate an upstream address and return its normal form.

    ``HTTP://Example.COM:80/api/`` becomes ``http://example.com/api``. An IP literal in a
    refused range (:mod:`~gateway_app.addresses`, plus ``deny``) is refused; a host name is
    checked when the gateway connects to it.
    """
    if not isinstance(address, str) or not address or len(address) > 2048:
        raise BadRequest("address must be an http or https URL")
    if any(c in address for c in "?#\\") or any(ord(c) <= 32 or ord(c) >= 127 for c in address):
        raise BadRequest("address must have no query, fragment, spaces or control characters")
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError:
        raise BadRequest("address has an invalid port") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise BadRequest("address must be an http or https URL")
    if "@" in parts.netloc:
        raise BadRequest("address must not carry user information")
    if not parts.hostname:
        raise BadRequest("address must name a host")
    if port is not None and not 1 <= port <= 65535:
        raise BadRequest("address port must be between 1 and 65535")
    if parts.netloc.endswith(":"):
        raise BadRequest("address has an empty port")
    host = _check_host(parts.hostname.lower(), deny)
    path = parts.path.rstrip("/")
    if has_dot_segment(path):
        raise BadRequest("address path must not contain '.' or '..' segments")
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


def instance_id(address: str) -> str:
    """The stable id of an instance: derived from its normalised address alone."""
    return hashlib.sha256(address.encode()).hexdigest()[:16]


def check_ttl(ttl: object) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise BadRequest("ttl must be a number of seconds")
    if not 1 <= ttl <= MAX_TTL:  # NaN fails it too (math.isfinite overflows on a huge int)
        raise BadRequest(f"ttl must be between 1 and {MAX_TTL} seconds")
    return float(ttl)


def check_weight(weight: object) -> int:
    if weight is None:
        return 1
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise BadRequest("weight must be a whole number")
    if not 1 <= weight <= MAX_WEIGHT:
        raise BadRequest(f"weight must be between 1 and {MAX_WEIGHT}")
    return weight


def check_metadata(metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadRequest("metadata must be an object of string keys and string values")
    check_json_value(metadata, "metadata", max_depth=1)
    encoded = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode()
    if len(encoded) > MAX_METADATA_BYTES:
        raise BadRequest(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return dict(metadata)


# -- JSON bodies -----------------------------------------------------------------------------


class _Refused(ValueError):
    """Raised by the parser's hooks: the message is the reason given to the caller."""


def _refuse_constant(name: str) -> NoReturn:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:32]} is too large")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 17 or abs(value := int(text)) > MAX_JSON_INTEGER:
        raise _Refused(f"integers must be within +-{MAX_JSON_INTEGER}")
    return value


def check_json_value(value: object, what: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse, with :class:`BadRequest`, a value that is not plain JSON within the gateway's
    bounds: nesting deeper than ``max_depth``, a string with a lone surrogate (it cannot be
    written as UTF-8), a number that is not finite or an integer beyond :data:`MAX_JSON_INTEGER`.
    """
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE_RE.search(item):
                raise BadRequest(f"{what} holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        elif isinstance(item, bool) or item is None:
            pass
        elif isinstance(item, int):
            if abs(item) > MAX_JSON_INTEGER:
                raise BadRequest(f"{what}: integers must be within +-{MAX_JSON_INTEGER}")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise BadRequest(f"{what}: numbers must be finite")
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise BadRequest(f"{what} nests deeper than {max_depth} levels")
            if isinstance(item, dict):
                stack.extend((key, depth + 1) for key in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        else:
            raise BadRequest(f"{what} holds a value that is not JSON")


def parse_json(text: str, what: str = "the body") -> Any:
    """The JSON document in ``text``, within the bounds of :func:`check_json_value`.

    The one parser of every registry and policy body: Python's own accepts ``NaN`` and
    ``Infinity``, turns ``1e400`` into infinity, and raises :class:`RecursionError` (not
    ``ValueError``) on deep nesting; here each of those is a :class:`BadRequest`.
    """
    try:
        doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                         parse_int=_bounded_int)
    except _Refused as exc:
        raise BadRequest(f"{what} is refused: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    check_json_value(doc, what)
    return doc
