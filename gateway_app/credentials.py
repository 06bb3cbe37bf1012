"""Registration credentials: a service may register, renew, drain and remove instances of the
services its credential names, from any address, and nothing else.

A credential is a JWT signed (HS256) with the gateway's registration key
(``GATEWAY_REGISTRATION_KEY_FILE``, else ``<data dir>/registration-key``), a key of its own:
no token a client holds for calling services is ever a registration credential, nor the other
way round. Its claims::

    {"aud": "gateway-registration", "sub": "orders-deployer", "services": ["orders"],
     "jti": "<32 hex>", "iat": ..., "exp": ...}

``exp`` is always set (:data:`DEFAULT_TTL`, at most :data:`MAX_TTL`), so a revocation need
only be kept until then. Two ways to revoke:

- rotate the key (replace the file, or delete the generated one, and restart or ``kill -HUP``
  the gateway): every credential made with the old key stops working;
- revoke one credential by its id (``DELETE /_gateway/registration-tokens/ID`` or
  ``gateway revoke ID``): the id goes to the registry's store, which carries it to every worker
  and, with Redis, every node, within the second that any registry write takes.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import BadRequest
from .validation import check_name

#: The audience of a registration credential; a token for anything else is not one.
AUDIENCE = "gateway-registration"
ALGORITHM = "HS256"
#: Seconds a credential lasts unless asked otherwise (30 days), and at most (a year).
DEFAULT_TTL = 30 * 86400
MAX_TTL = 365 * 86400
MAX_SERVICES = 32
#: Longer ``Authorization`` values are not read as credentials.
MAX_CREDENTIAL_BYTES = 4096
#: Revoked credentials kept at once (each until its latest possible expiry).
MAX_REVOKED = 10_000
#: A credential's id: 32 hex digits.
ID_RE = re.compile(r"^[0-9a-f]{32}$")
_SUBJECT_RE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]{0,126}[\x21-\x7e])?$")


class InvalidCredential(Exception):
    """Not a valid registration credential (malformed, wrong key, expired, revoked)."""


@dataclass(frozen=True)
class Credential:
    """A verified registration credential."""

    id: str
    subject: str
    services: frozenset[str]
    expires_at: float


def check_services(value: object) -> list[str]:
    """Valid service names, 1 to :data:`MAX_SERVICES` of them, or :class:`BadRequest`."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SERVICES:
        raise BadRequest(f"services must be a list of 1 to {MAX_SERVICES} service names")
    return list(dict.fromkeys(check_name(name) for name in value))


def check_ttl(value: object) -> int:
    if value is None:
        return DEFAULT_TTL
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 1 <= value <= MAX_TTL:
        raise BadRequest(f"ttl must be a number of seconds from 1 to {MAX_TTL}")
    return int(value)


def check_subject(value: object, services: list[str]) -> str:
    if value is None:
        return "registration:" + ",".join(services)[:100]
    if not isinstance(value, str) or not _SUBJECT_RE.match(value):
        raise BadRequest("sub must be 1 to 128 printable ASCII characters")
    return value


class RegistrationCredentials:
    """Mints and verifies registration credentials with one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def mint(self, services: Iterable[str], ttl: object = None, subject: object = None
             ) -> tuple[str, dict[str, Any]]:
        """A new credential and its claims; :class:`BadRequest` for bad arguments."""
        names = check_services(list(services))
        seconds = check_ttl(ttl)
        now = int(time.time())
        claims = {
            "aud": AUDIENCE,
            "sub": check_subject(subject, names),
            "services": names,
            "jti": secrets.token_hex(16),
            "iat": now,
            "exp": now + seconds,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM), claims

    def verify(self, token: str, revoked: Mapping[str, float]) -> Credential:
        """The credential, or :class:`InvalidCredential` (never saying more than why)."""
        if len(token) > MAX_CREDENTIAL_BYTES:
            raise InvalidCredential("too long")
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], audience=AUDIENCE,
                                options={"require": ["exp", "jti", "sub"]})
        except jwt.PyJWTError as exc:
            raise InvalidCredential(str(exc) or type(exc).__name__) from None
        jti, services = claims.get("jti"), claims.get("services")
        if not isinstance(jti, str) or not ID_RE.match(jti):
            raise InvalidCredential("malformed id")
        if jti in revoked:
            raise InvalidCredential("revoked")
        if not isinstance(services, list) or not services \
                or not all(isinstance(s, str) for s in services):
            raise InvalidCredential("malformed services")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not _SUBJECT_RE.match(subject):
            raise InvalidCredential("malformed subject")
        return Credential(jti, subject, frozenset(services), float(claims["exp"]))
