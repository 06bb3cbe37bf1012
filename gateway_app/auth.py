"""JWT checking: :class:`TokenVerifier` and the :func:`require_jwt` view decorator.

The token's own ``alg`` header is only used to pick among the algorithms the operator allowed,
and each allowed algorithm is bound to keys of the right kind (the HMAC secret for ``HS*``,
the PEM public key or the identity provider's keys for the others), so ``alg: none`` and HS/RS
confusion cannot verify. The provider's keys (:mod:`gateway_app.jwks`) are found by the
token's ``kid``, each bound to the algorithms its type fits; a token they verify must carry
the provider's issuer (``GATEWAY_OIDC_ISSUER``, else ``GATEWAY_JWT_ISSUER`` when set).

Verified tokens are cached by their exact string until their ``exp`` (plus leeway): a cache
hit is one dict lookup and a float comparison. The cache is bounded in entries and in bytes,
and evicts its oldest entry in constant time.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
from flask import current_app, g, request

from .config import ConfigError
from .errors import Unauthorized
from .jwks import ProviderKeys
from .settings import HMAC_ALGORITHMS, Settings

#: Tokens longer than this are refused unread.
MAX_TOKEN_BYTES = 8192
#: Verified tokens kept; the oldest go first when it is full.
CACHE_SIZE = 10_000
#: Bytes of verified tokens kept, as estimated by :func:`_entry_cost`; the oldest go first
#: beyond it. 10,000 tokens of up to ~600 characters fit; longer ones are kept fewer.
CACHE_BYTES = 16 * 1024 * 1024
#: Estimated bytes of a cache entry besides what grows with its token: the str header, a small
#: claims dict, the tuple, the float, the dict slot and the OrderedDict link.
ENTRY_OVERHEAD = 512
#: The latest time ``exp``, ``nbf`` and ``iat`` may name (9999-12-31T23:59:59Z), and the
#: magnitude of the earliest: beyond it a time is a mistake or an attack (``exp: 1e308``).
MAX_NUMERIC_DATE = 253402300799
_TIME_CLAIMS = ("exp", "nbf", "iat")
_SUBJECT_RE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]{0,254}[\x21-\x7e])?$")


class InvalidToken(Exception):
    """The token was present but does not verify; the message says why (never the token),
    ``reason`` in a word, for the metrics (one of :data:`gateway_app.metrics.TOKEN_REASONS`)."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


class _BadSignature(InvalidToken):
    """The signature does not verify with the key tried (another key may be tried)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "bad_signature")


#: PyJWT's refusals by the reason they are counted under (the first match wins).
_JWT_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.DecodeError, "malformed"),
    (jwt.InvalidTokenError, "bad_claim"),
)


def _entry_cost(token: str) -> int:
    """Estimated bytes a cached token holds: its characters, its claims (JSON of three quarters
    of its length, about as many bytes again as objects) and :data:`ENTRY_OVERHEAD`.

    Measured on CPython 3.11: a 148-byte token costs 830 bytes (estimate 808), a 7.7 KB one
    with a long string claim 14 KB (estimate 16 KB). Claims made of thousands of tiny values
    cost several times more than the estimate.
    """
    return 2 * len(token) + ENTRY_OVERHEAD


def load_public_key(path: Path, algorithms: tuple[str, ...]) -> dict[str, Any]:
    """Parse the PEM public key once per public-key algorithm of the allow-list that its type
    fits (an RSA key verifies ``RS*``/``PS*``, a P-256 key ``ES256``...);
    :class:`~gateway_app.config.ConfigError` when it fits none."""
    pem = path.read_bytes()
    keys = {}
    for alg in algorithms:
        if alg not in HMAC_ALGORITHMS:
            try:
                keys[alg] = jwt.get_algorithm_by_name(alg).prepare_key(pem)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue  # another type of key
    if not keys:
        raise ConfigError(f"GATEWAY_JWT_PUBLIC_KEY_FILE: {str(path)!r} holds no public key for "
                          f"the algorithms in GATEWAY_JWT_ALGORITHMS ({','.join(algorithms)})")
    return keys


class TokenVerifier:
    """Verifies tokens against the configured keys, algorithms and claims."""

    def __init__(self, settings: Settings, secret: bytes | None,
                 public_keys: Mapping[str, Any] | None = None,
                 provider: ProviderKeys | None = None) -> None:
        self.algorithms = settings.jwt_algorithms
        self._allowed = frozenset(self.algorithms)
        self.issuer = settings.jwt_issuer
        #: The issuer of tokens signed with the provider's keys.
        self.provider_issuer = settings.oidc_issuer or settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway
        #: The identity provider's keys (``None`` without GATEWAY_JWT_JWKS_URL or
        #: GATEWAY_OIDC_ISSUER). When a key leaves its set, the cache is emptied.
        self.provider = provider
        if provider is not None:
            provider.on_removal = self.clear_cache
        #: The static keys by algorithm: the HMAC secret, the PEM public key.
        self._keys: dict[str, Any] = dict(public_keys or {})
        for alg in self.algorithms:
            if alg in HMAC_ALGORITHMS:
                if secret is None:
                    raise ValueError("an HMAC algorithm is allowed but no secret was given")
                self._keys[alg] = secret
        self._options: dict[str, Any] = {
            "require": ["exp"],
            "verify_aud": self.audience is not None,
        }
        #: token -> (claims, valid until), oldest first: eviction is ``popitem(last=False)``,
        #: O(1) (a dict's ``next(iter(d))`` slows down as deletions pile up at its front).
        self._cache: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        #: The cache's ``get``, bound once: as cheap a hit as a plain dict's ``self._cache.get``.
        self._cache_get = self._cache.get
        #: The sum of :func:`_entry_cost` over the cache. Writes hold ``_cache_lock``.
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        #: Moves when the cache is emptied, so a token verified just before is not put back.
        self._generation = 0

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`InvalidToken`."""
        hit = self._cache_get(token)
        if hit is not None:
            if time.time() < hit[1]:
                return hit[0]
            self._forget(token)
        generation = self._generation
        claims = self._decode(token)
        self._remember(token, claims, generation)
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("token too long", "too_long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token", "malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise InvalidToken("token algorithm not allowed", "algorithm")
        static = self._keys.get(alg)
        provider = self.provider
        if provider is None or alg in HMAC_ALGORITHMS:
            if static is None:
                raise InvalidToken("token algorithm not allowed", "algorithm")
            return self._verify(token, static, alg, self.issuer)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed token: kid must be a string", "malformed")
        key = provider.get(kid, alg)
        if key is None and static is not None:
            # The PEM key, for a token the provider's current keys do not name; when it does
            # not verify and the token names a kid, the provider may have a new key.
            try:
                return self._verify(token, static, alg, self.issuer)
            except _BadSignature:
                if kid is None:
                    raise
        if key is None:
            key = provider.get_or_fetch(kid, alg)
        if key is None:
            if provider.unavailable_reason() is not None:
                raise InvalidToken("the identity provider's keys are not available",
                                   "keys_unavailable")
            raise InvalidToken("no signing key for this token (kid and alg)"
                               if kid is not None else "token has no kid", "unknown_kid")
        return self._verify(token, key, alg, self.provider_issuer)

    def _verify(self, token: str, key: Any, alg: str, issuer: str | None) -> dict[str, Any]:
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg],
                options=self._options,  # type: ignore[arg-type]
                audience=self.audience, issuer=issuer, leeway=self.leeway,
            )
        except jwt.InvalidSignatureError:
            raise _BadSignature("Signature verification failed") from None
        except jwt.PyJWTError as exc:
            reason = next((r for t, r in _JWT_REASONS if isinstance(exc, t)), "other")
            raise InvalidToken(str(exc) or type(exc).__name__, reason) from None
        for name in _TIME_CLAIMS:
            value = claims.get(name)
            if value is None and name != "exp":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not -MAX_NUMERIC_DATE <= value <= MAX_NUMERIC_DATE:  # NaN fails too
                raise InvalidToken(f"{name} must be a number of seconds before the year 10000",
                                   "bad_claim")
        sub = claims.get("sub")
        if sub is not None and (not isinstance(sub, str) or not _SUBJECT_RE.match(sub)):
            raise InvalidToken("sub must be 1 to 256 printable ASCII characters", "bad_claim")
        return claims

    def _remember(self, token: str, claims: dict[str, Any], generation: int) -> None:
        """Cache a verified token, first evicting the oldest entries it would not fit beside.

        Each entry is evicted at most once after being added once: O(1) per call, amortised.
        """
        until = float(claims["exp"]) + self.leeway
        cost = _entry_cost(token)
        with self._cache_lock:
            if generation != self._generation:
                return  # the cache was emptied while this token was verified: a key left
            cache = self._cache
            if cache.pop(token, None) is not None:  # two threads verified it at once
                self._cache_bytes -= cost
            while cache and (len(cache) >= CACHE_SIZE
                             or self._cache_bytes + cost > CACHE_BYTES):
                oldest, _ = cache.popitem(last=False)
                self._cache_bytes -= _entry_cost(oldest)
            cache[token] = (claims, until)
            self._cache_bytes += cost

    def clear_cache(self) -> None:
        """Forget every verified token (a key that may have signed some left the key set)."""
        with self._cache_lock:
            self._generation += 1
            self._cache.clear()
            self._cache_bytes = 0

    def close(self) -> None:
        if self.provider is not None:
            self.provider.close()

    def _forget(self, token: str) -> None:
        """Drop a token's entry (found expired)."""
        with self._cache_lock:
            if self._cache.pop(token, None) is not None:
                self._cache_bytes -= _entry_cost(token)

    def mint(self, private_key: Any, sub: str, ttl: float = 3600,
             claims: Mapping[str, Any] | None = None) -> str:
        """A token this verifier accepts, signed with its first allowed algorithm (its first
        HMAC one when no private key is given)."""
        alg = self.algorithms[0]
        if private_key is None:
            alg = next((a for a in self.algorithms if a in HMAC_ALGORITHMS), alg)
        key = self._keys[alg] if alg in HMAC_ALGORITHMS else private_key
        if key is None:
            raise ValueError(f"{alg} needs a private key (GATEWAY_JWT_PRIVATE_KEY_FILE)")
        now = int(time.time())
        payload: dict[str, Any] = dict(claims or {})
        payload.update({"sub": sub, "iat": now, "exp": now + int(ttl)})
        if self.issuer:
            payload["iss"] = self.issuer
        if self.audience:
            payload["aud"] = self.audience
        return jwt.encode(payload, key, algorithm=alg)


def bearer_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case);
    ``None`` for any other header, or none."""
    scheme, _, rest = (value or "").strip().partition(" ")
    token = rest.strip()
    return token if token and scheme.lower() == "bearer" else None


def token_from_header(value: str | None) -> str | None:
    """The token of an ``Authorization`` header: ``Bearer <token>`` or the bare token."""
    if not value:
        return None
    token = bearer_token(value)
    if token is not None:
        return token
    scheme, _, rest = value.strip().partition(" ")
    # The seed's client sends the token bare; another scheme fails verification, reported as
    # an invalid token.
    return value if rest else scheme


NO_TOKEN_CHALLENGE = 'Bearer realm="gateway"'  # noqa: S105 (not a secret)
INVALID_TOKEN_CHALLENGE = 'Bearer realm="gateway", error="invalid_token"'  # noqa: S105


def check_request() -> dict[str, Any]:
    """Verify the current request's token; claims, or :class:`Unauthorized`."""
    token = token_from_header(request.environ.get("HTTP_AUTHORIZATION"))
    if token is None:
        missing = Unauthorized("a bearer token is required",
                               headers={"WWW-Authenticate": NO_TOKEN_CHALLENGE})
        missing.kind = "missing"
        raise missing
    verifier: TokenVerifier = current_app.extensions["gateway"].verifier
    try:
        return verifier.verify(token)
    except InvalidToken as exc:
        refused = Unauthorized(f"invalid token: {exc}",
                               headers={"WWW-Authenticate": INVALID_TOKEN_CHALLENGE})
        refused.kind = exc.reason
        raise refused from None


def require_jwt(view: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse the request with 401 unless it carries a valid token; its claims go on the
    request's view (``g.view.claims``).

    A service whose policy sets ``auth: none`` is public: the check is skipped for it.
    """

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        request_view = g.view
        if not request_view.public:
            request_view.claims = check_request()
        return view(*args, **kwargs)

    return wrapper
