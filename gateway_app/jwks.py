"""Signing keys from the identity provider: a JWKS URL, or an OIDC issuer's discovery document.

:class:`ProviderKeys` holds one worker's copy of the provider's keys. Request threads look a
key up by ``kid`` in an immutable dict (no lock, no I/O). A background thread per worker
refetches the set every ``GATEWAY_JWKS_REFRESH`` seconds (600 by default; the provider's
``Cache-Control: max-age`` instead, clamped to :data:`MIN_REFRESH`..:data:`MAX_REFRESH`), and
after a failure retries with a backoff of 1 s doubling to :data:`RETRY_MAX`, so a gateway
started while the provider was down picks its keys up soon after it answers.

An unknown ``kid`` wakes that thread for one fetch, at most once per ``GATEWAY_JWKS_COOLDOWN``
(30 s) per worker: the threads that meet an unknown ``kid`` while that fetch runs wait for it
(at most :data:`UNKNOWN_KID_WAIT`), and the ones that come after it, within the cooldown,
are answered at once without a fetch. A storm of forged ``kid`` s costs one fetch.

A failed fetch (the provider down or slow, an HTTP error, a body that is not a key set or has
no usable key) changes nothing: the last good keys stay. A new set replaces the old one whole,
so a key the provider removed stops verifying at the next refresh.

Each key is bound to the algorithms its type fits and the operator allowed
(``GATEWAY_JWT_ALGORITHMS``): an RSA key verifies ``RS*``/``PS*`` only, a P-256 key ``ES256``
only, an Ed25519 key ``EdDSA`` only; a key's own ``alg`` narrows that to one. Symmetric
(``oct``) keys are never taken from a key set, so a token cannot make the gateway verify an
HMAC signature keyed with public material. Private key material, RSA keys under 2048 bits,
keys for another ``use`` and malformed keys are skipped.

Why not PyJWT's ``PyJWKClient``: it is a good client for one script, but as a gateway's key
cache it misses most of what we need, so this module is the cache and uses PyJWT below it
(``Algorithm.from_jwk`` to read each key, ``jwt.decode`` to verify):

- it holds one lock across the network fetch, so every request thread queues behind a slow
  provider for the whole timeout, and an expired set is refetched on the request path;
- it reads the whole body (no 1 MiB or 256-key bound), uses urllib (which follows the
  ``*_proxy`` environment variables), and has no notion of refused or loopback-only addresses;
- it trusts each JWK's ``alg`` and accepts ``oct`` keys, and cannot express "this RSA key may
  verify RS256 and PS256 but nothing else";
- it has no background refresh, no ``Cache-Control``, and its cooldown starts at every fetch,
  so a key rotated in just after a scheduled fetch waits out the cooldown.

Fetching and discovery are :mod:`~gateway_app.jwks_fetch`'s.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.exceptions import PyJWTError

from .config import ConfigError
from .jwks_fetch import (
    ProviderError,
    ProviderUnavailable,
    discover,
    fetch_json,
    max_age,
)
from .settings import PUBLIC_KEY_ALGORITHMS, Settings

log = logging.getLogger("gateway.jwks")

#: A key set with more keys than this is refused.
MAX_KEYS = 256
#: A ``kid`` longer than this (in a key set or a token) is never looked up.
MAX_KID_CHARS = 256
#: The provider's ``Cache-Control: max-age`` is clamped to these (seconds); a configured
#: GATEWAY_JWKS_REFRESH below :data:`MIN_REFRESH` lowers the floor to itself.
MIN_REFRESH = 60.0
MAX_REFRESH = 86400.0
#: After a failed fetch, the next try comes 1 s later, then 2, 4... up to this (seconds).
RETRY_MAX = 30.0
#: Seconds a request thread waits for the fetch its unknown ``kid`` caused (or joined).
UNKNOWN_KID_WAIT = 2.0
#: Warnings about an unavailable provider are logged at most this often (seconds).
LOG_EVERY = 30.0
_PRINTABLE_RE = re.compile(r"^[\x20-\x7e]+$")

#: The algorithms each key type fits (EC and OKP by curve).
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_CURVE_ALGORITHMS: dict[tuple[Any, Any], frozenset[str]] = {
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
}
#: JWK members that carry private (or symmetric) key material.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
#: The smallest RSA modulus accepted (NIST SP 800-131A; PyJWT would warn on every decode).
MIN_RSA_BITS = 2048


# -- reading a key set --------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderKey:
    """One usable key of the set: its id, the algorithms it may verify, the key object."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any


#: kid (``None`` for keys without one) -> the keys with that id.
KeyTable = Mapping[str | None, tuple[ProviderKey, ...]]


def _fitting(jwk: dict[str, Any], allowed: frozenset[str]) -> frozenset[str]:
    """The algorithms ``jwk`` may verify: those its type fits, that the operator allowed, and
    its own ``alg`` when it names one."""
    kty = jwk.get("kty")
    if kty == "RSA":
        fits = _RSA_ALGORITHMS
    elif kty in ("EC", "OKP"):
        fits = _CURVE_ALGORITHMS.get((kty, jwk.get("crv")), frozenset())
    else:  # "oct" (a shared secret, never taken from a key set) or unknown
        return frozenset()
    fits = fits & allowed
    alg = jwk.get("alg")
    if alg is not None:
        return fits & {alg} if isinstance(alg, str) else frozenset()
    return fits


def parse_key_set(document: Any, allowed: frozenset[str], url: str
                  ) -> tuple[dict[str | None, tuple[ProviderKey, ...]], list[str]]:
    """The usable keys of a JWKS document by ``kid``, and why the others were skipped.

    :class:`ProviderError` when the document is not a key set, holds more than
    :data:`MAX_KEYS` keys, or none of them is usable."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ProviderError(f"the key set at {url} is not a JSON object with a 'keys' list")
    members = document["keys"]
    if len(members) > MAX_KEYS:
        raise ProviderError(f"the key set at {url} has {len(members)} keys; at most "
                            f"{MAX_KEYS} are accepted")
    table: dict[str | None, list[ProviderKey]] = {}
    skipped = []
    for index, jwk in enumerate(members):
        reason = _skip_reason(jwk, allowed)
        key = None
        if reason is None:
            algorithms = _fitting(jwk, allowed)
            try:
                key = jwt.get_algorithm_by_name(next(iter(algorithms))).from_jwk(jwk)
            except (PyJWTError, ValueError, TypeError, KeyError, AttributeError) as exc:
                reason = f"unreadable ({type(exc).__name__})"
            else:
                size = getattr(key, "key_size", None)
                if jwk["kty"] == "RSA" and (size is None or size < MIN_RSA_BITS):
                    reason = f"an RSA key of {size} bits (under {MIN_RSA_BITS})"
                elif not hasattr(key, "verify"):
                    reason = "not a public key"
        if reason is not None:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            shown = repr(kid)[:40] if isinstance(kid, str) else f"#{index}"
            skipped.append(f"{shown}: {reason}")
            continue
        kid = jwk.get("kid")
        table.setdefault(kid, []).append(ProviderKey(kid, algorithms, key))
    if not table:
        detail = "; ".join(skipped[:5]) or "the set is empty"
        raise ProviderError(f"the key set at {url} has no key usable with the allowed "
                            f"algorithms ({', '.join(sorted(allowed))}): {detail}")
    return {kid: tuple(keys) for kid, keys in table.items()}, skipped


def _skip_reason(jwk: object, allowed: frozenset[str]) -> str | None:
    if not isinstance(jwk, dict):
        return "not a JSON object"
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS
                            or not _PRINTABLE_RE.match(kid)):
        return f"kid must be 1 to {MAX_KID_CHARS} printable ASCII characters"
    if jwk.get("kty") == "oct":
        return "a symmetric (oct) key: never taken from a key set"
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        return "it carries private key material"
    use = jwk.get("use")
    if use is not None and use != "sig":
        return f"use is {str(use)[:20]!r}, not 'sig'"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "its key_ops do not include 'verify'"
    if not _fitting(jwk, allowed):
        return (f"kty {str(jwk.get('kty'))[:10]!r}, crv {str(jwk.get('crv'))[:10]!r}, "
                f"alg {str(jwk.get('alg'))[:10]!r} fit no allowed algorithm")
    return None


# -- the cache -----------------------------------------------------------------------------


class ProviderKeys:
    """One worker's copy of the provider's keys, kept fresh by a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.issuer = settings.oidc_issuer
        #: The key set's URL: configured, or found by discovery (``None`` until then).
        self.jwks_url: str | None = settings.jwt_jwks_url
        self.allowed = frozenset(settings.jwt_algorithms) & PUBLIC_KEY_ALGORITHMS
        self.refresh = settings.jwks_refresh
        self.cooldown = settings.jwks_cooldown
        self.timeout = settings.jwks_timeout
        self.ca_bundle = settings.upstream_ca_bundle
        #: Called with no argument after a new set removed a key (the verifier then forgets
        #: the tokens it verified, some of which that key may have signed).
        self.on_removal: Callable[[], None] | None = None
        #: The current keys; replaced whole, never mutated.
        self.keys: KeyTable = {}
        #: Fetches of the key set this process made (successful or not); for tests.
        self.fetches = 0
        #: Why the last fetch failed (``None`` after a success).
        self.last_error: str | None = None
        self._lock = threading.Lock()
        #: Set when the fetch a request thread is waiting for is done.
        self._flight: threading.Event | None = None
        #: No fetch for an unknown kid before this (monotonic).
        self._cooldown_until = 0.0
        self._next_refresh = 0.0
        self._failures = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running = False
        self._last_log = -LOG_EVERY
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(ref))

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """The first fetch, before serving. :class:`ProviderError` when the provider answered
        with something unusable; when it cannot be reached the keys stay empty (tokens get
        401 with that reason) and the thread keeps trying."""
        try:
            self._fetch()
        except ProviderUnavailable as exc:
            self._failed(exc)
        self.start()

    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
            self._stop.clear()
        threading.Thread(target=self._run, name="jwks-refresh", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._running = False

    # -- lookups (request threads) -----------------------------------------------------------

    def get(self, kid: str | None, alg: str) -> Any | None:
        """The key with this ``kid`` that may verify ``alg``, from the current set."""
        for candidate in self.keys.get(kid, ()):
            if alg in candidate.algorithms:
                return candidate.key
        return None

    def get_or_fetch(self, kid: str | None, alg: str) -> Any | None:
        """:meth:`get`; for a ``kid`` not in the set, one fetch per cooldown (joined by the
        threads that come while it runs, waiting at most :data:`UNKNOWN_KID_WAIT`)."""
        key = self.get(kid, alg)
        if key is not None or kid is None or len(kid) > MAX_KID_CHARS:
            return key
        if not self._running:
            self.start()
        with self._lock:
            flight = self._flight
            if flight is None:
                now = time.monotonic()
                if now < self._cooldown_until:
                    return None  # a fetch for an unknown kid ran lately: no other one yet
                self._cooldown_until = now + self.cooldown
                flight = self._flight = threading.Event()
                log.info("a token names an unknown key id; fetching the provider's keys")
                self._wake.set()
        flight.wait(min(UNKNOWN_KID_WAIT, self.timeout + 0.5))
        return self.get(kid, alg)

    def unavailable_reason(self) -> str | None:
        """Why there are no keys at all (``None`` when there are some)."""
        if self.keys:
            return None
        return self.last_error or "the identity provider's keys have not been fetched yet"

    # -- the refresh thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(max(0.0, self._next_refresh - time.monotonic()))
            if self._stop.is_set():
                return
            self._wake.clear()
            with self._lock:
                flight = self._flight
            if flight is None and time.monotonic() < self._next_refresh:
                continue
            try:
                self._fetch()
            except ProviderError as exc:
                self._failed(exc)
            except Exception as exc:  # noqa: BLE001 (this thread must outlive any surprise)
                log.exception("fetching the identity provider's keys failed unexpectedly")
                self._failed(ProviderUnavailable(f"unexpected {type(exc).__name__}"))
            finally:
                if flight is not None:
                    with self._lock:
                        if self._flight is flight:
                            self._flight = None
                    flight.set()

    def _fetch(self) -> None:
        """Fetch the set (discovering its URL first if need be) and publish it; raises
        :class:`ProviderError` having changed nothing."""
        try:
            if self.jwks_url is None:
                assert self.issuer is not None
                self.jwks_url = discover(self.issuer, self.timeout, self.ca_bundle)
            self.fetches += 1
            fetched = fetch_json(self.jwks_url, self.timeout, self.ca_bundle, "the key set")
            keys, skipped = parse_key_set(fetched.document, self.allowed, self.jwks_url)
        except ProviderError as exc:
            self.last_error = str(exc)
            raise
        if skipped:
            self._log(logging.INFO, "skipped %d key(s) of %s: %s", len(skipped), self.jwks_url,
                      "; ".join(skipped[:5]))
        old = self.keys
        self.keys = keys
        self.last_error = None
        self._failures = 0
        self._next_refresh = time.monotonic() + self._interval(fetched.max_age)
        if old and _removed(old, keys) and self.on_removal is not None:
            self.on_removal()

    def _interval(self, provider_max_age: float | None) -> float:
        if provider_max_age is None:
            return self.refresh
        return min(MAX_REFRESH, max(min(MIN_REFRESH, self.refresh), provider_max_age))

    def _failed(self, exc: ProviderError) -> None:
        self._failures += 1
        delay = min(RETRY_MAX, self.refresh, 2.0 ** (self._failures - 1))
        self._next_refresh = time.monotonic() + delay
        what = "keeping the last good keys" if self.keys else "no keys yet: tokens are refused"
        self._log(logging.WARNING, "fetching the identity provider's keys failed (%s; next try "
                  "in %.0f s): %s", what, delay, exc)

    def _log(self, level: int, message: str, *args: Any) -> None:
        """Log, at most once per :data:`LOG_EVERY` seconds for warnings (an outage would
        otherwise log on every retry of every worker)."""
        now = time.monotonic()
        if level >= logging.WARNING:
            if now - self._last_log < LOG_EVERY:
                return
            self._last_log = now
        log.log(level, message, *args)


def _removed(old: KeyTable, new: KeyTable) -> bool:
    """True when a key of ``old`` is not in ``new`` (same kid, algorithms and public key)."""
    for kid, keys in old.items():
        kept = new.get(kid, ())
        for key in keys:
            if not any(k.algorithms == key.algorithms and _same_key(k.key, key.key)
                       for k in kept):
                return True
    return False


def _same_key(a: Any, b: Any) -> bool:
    try:
        return bool(a.public_numbers() == b.public_numbers())
    except AttributeError:  # Ed25519/Ed448 keys have no numbers: compare their bytes
        from cryptography.hazmat.primitives import serialization

        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return bool(a.public_bytes(*raw) == b.public_bytes(*raw))


def _after_fork(ref: weakref.ref[ProviderKeys]) -> None:
    """Threads and locks do not survive fork: a child starts its own refresh thread."""
    keys = ref()
    if keys is not None:
        keys._running = False
        keys._lock = threading.Lock()
        keys._flight = None
        keys._wake = threading.Event()
        keys._stop = threading.Event()


def check_provider(settings: Settings) -> str | None:
    """For the gunicorn master, before any worker starts: fetch the keys once. Raises
    :class:`~gateway_app.config.ConfigError` when the provider answers with something unusable
    (a wrong issuer, no ``jwks_uri``, not JSON, no usable key...); returns a warning to log
    when it cannot be reached (the gateway then starts without keys and keeps trying)."""
    keys = ProviderKeys(settings)
    try:
        keys._fetch()
    except ProviderUnavailable as exc:
        return f"the identity provider cannot be reached; starting anyway: {exc}"
    except ProviderError as exc:
        variable = "GATEWAY_OIDC_ISSUER" if settings.oidc_issuer else "GATEWAY_JWT_JWKS_URL"
        raise ConfigError(f"{variable}: {exc}") from None
    return None


__all__ = ["ProviderKeys", "ProviderError", "ProviderUnavailable", "check_provider",
           "discover", "fetch_json", "parse_key_set", "max_age"]
