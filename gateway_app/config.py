"""Configuration: ``GATEWAY_*`` parsing and validation, into :class:`~gateway_app.settings.Settings`
(whose module holds the defaults and tables).

Everything is read once, by :func:`load_settings`, from a mapping (the environment, or the
overrides a test passes to ``create_app``). A bad value raises :class:`ConfigError` whose
message names the variable, so ``gunicorn`` refuses to start with a sentence a user can act on.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import stores
from .ratelimit import RateLimit, RateLimitError, parse_rate_limit
from .settings import (
    DEFAULT_AUTH_FAILURE_LIMIT,
    DEFAULT_CLIENT_BODY_TIMEOUT,
    DEFAULT_CLIENT_HEADER_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_JWKS_COOLDOWN,
    DEFAULT_JWKS_REFRESH,
    DEFAULT_JWKS_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT,
    FAST_PATH_NAMES,
    HMAC_ALGORITHMS,
    MAX_PROVIDER_URL,
    PROVIDER_ALGORITHMS,
    PUBLIC_KEY_ALGORITHMS,
    STRATEGIES,
    Settings,
)

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def check_provider_url(url: str, name: str, query: bool = True) -> str:
    """An identity provider's URL (a JWKS URL, an issuer, a discovered ``jwks_uri``), or
    :class:`ConfigError` naming ``name``: ``https``, or ``http`` to a loopback address only;
    a host; no user-info or fragment (and no query when ``query`` is false); never a
    link-local, unspecified or multicast address."""
    if len(url) > MAX_PROVIDER_URL or any(ord(c) <= 32 or ord(c) >= 127 for c in url):
        raise ConfigError(f"{name}: expected an https URL of printable ASCII, at most "
                          f"{MAX_PROVIDER_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ConfigError(f"{name}: {url!r} is not a valid URL") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        raise ConfigError(f"{name}: expected an https URL with a host, got {url!r}")
    if "@" in parts.netloc or parts.fragment or "#" in url or (parts.query and not query):
        raise ConfigError(f"{name}: the URL must have no user information, fragment"
                          f"{'' if query else ' or query'}, got {url!r}")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is not None and (ip.is_link_local or ip.is_unspecified or ip.is_multicast):
        raise ConfigError(f"{name}: {host} is a link-local, unspecified or multicast address")
    if scheme == "http" and not (host == "localhost" or (ip is not None and ip.is_loopback)):
        raise ConfigError(f"{name}: plain http is allowed to a loopback address only "
                          f"(127.0.0.1, ::1, localhost); use https, got {url!r}")
    return url


def _get(env: Mapping[str, object], key: str) -> str | None:
    value = env.get(key)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _number(env: Mapping[str, object], key: str, default: float, low: float, high: float,
            kind: type = float) -> Any:
    """``key`` as ``kind`` (int or float) within ``low``..``high``, or ``default`` when unset."""
    text = _get(env, key)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number of seconds"
        raise ConfigError(f"{key}: expected {what}, got {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be between {low} and {high}, got {text}")
    return value


def _int(env: Mapping[str, object], key: str, default: int, low: int, high: int) -> int:
    return int(_number(env, key, default, low, high, int))


def _float(env: Mapping[str, object], key: str, default: float, low: float, high: float) -> float:
    return float(_number(env, key, default, low, high, float))


def _networks(env: Mapping[str, object], key: str, default: str):
    text = _get(env, key)
    text = default if text is None else text
    nets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {part!r} is not an IP address or network") from None
    return tuple(nets)


def _fast_paths(env: Mapping[str, object]) -> frozenset[str]:
    """``GATEWAY_FAST_PATHS``: ``on`` (all, the default), ``off`` (none: the stock path of
    every library), or a comma-separated list of the ones to use."""
    text = (_get(env, "GATEWAY_FAST_PATHS") or "on").lower()
    if text == "on":
        return frozenset(FAST_PATH_NAMES)
    if text == "off":
        return frozenset()
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(names - set(FAST_PATH_NAMES))
    if unknown:
        raise ConfigError(f"GATEWAY_FAST_PATHS: expected on, off or some of "
                          f"{', '.join(FAST_PATH_NAMES)}; unknown {', '.join(unknown)}")
    return names


def _path(env: Mapping[str, object], key: str) -> Path | None:
    text = _get(env, key)
    return Path(text) if text else None


def validate_store_url(url: str) -> str:
    """Check a ``GATEWAY_STORE`` URL's form; the store itself opens it later."""
    try:
        return stores.check_url(url)
    except ValueError as exc:
        raise ConfigError(f"GATEWAY_STORE: {exc}") from None


def _rate_limit(text: str, name: str) -> RateLimit:
    try:
        return parse_rate_limit(text, name)
    except RateLimitError as exc:
        raise ConfigError(str(exc)) from None


def load_settings(env: Mapping[str, object] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default: ``os.environ``), validating every value."""
    env = os.environ if env is None else env
    bind = _get(env, "GATEWAY_BIND") or "127.0.0.1:8080"
    if ":" not in bind and not bind.startswith("unix:"):
        raise ConfigError(f"GATEWAY_BIND: expected HOST:PORT, got {bind!r}")
    workers = _int(env, "GATEWAY_WORKERS", 2, 1, 64)
    threads = _int(env, "GATEWAY_THREADS", 16, 1, 1024)
    data_dir = Path(_get(env, "GATEWAY_DATA_DIR") or "var")
    default_store = f"sqlite:///{data_dir / 'registry.db'}"
    store = validate_store_url(_get(env, "GATEWAY_STORE") or default_store)
    if store == "memory://" and workers > 1:
        raise ConfigError(
            "GATEWAY_STORE: memory:// keeps the registry inside one process, so with"
            f" GATEWAY_WORKERS={workers} each worker would see a different registry;"
            " use GATEWAY_WORKERS=1 or the default SQLite store"
        )

    jwks_url = _get(env, "GATEWAY_JWT_JWKS_URL")
    oidc_issuer = _get(env, "GATEWAY_OIDC_ISSUER")
    if jwks_url and oidc_issuer:
        raise ConfigError("GATEWAY_JWT_JWKS_URL: set either it or GATEWAY_OIDC_ISSUER (whose "
                          "discovery document names the key set), not both")
    if jwks_url:
        check_provider_url(jwks_url, "GATEWAY_JWT_JWKS_URL")
    if oidc_issuer:
        check_provider_url(oidc_issuer, "GATEWAY_OIDC_ISSUER", query=False)
    provider = bool(jwks_url or oidc_issuer)

    default_algorithms = ",".join(PROVIDER_ALGORITHMS) if provider else "HS256"
    algorithms = tuple(
        a.strip() for a in (_get(env, "GATEWAY_JWT_ALGORITHMS") or default_algorithms).split(",")
        if a.strip()
    )
    for alg in algorithms:
        if alg not in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
            raise ConfigError(f"GATEWAY_JWT_ALGORITHMS: unknown or refused algorithm {alg!r}")
    if not algorithms:
        raise ConfigError("GATEWAY_JWT_ALGORITHMS: name at least one algorithm")
    if provider and not any(a in PUBLIC_KEY_ALGORITHMS for a in algorithms):
        raise ConfigError("GATEWAY_JWT_ALGORITHMS: the identity provider's keys need a public-key"
                          f" algorithm (RS256, ES256, EdDSA...), got {','.join(algorithms)}")
    public_key_file = _path(env, "GATEWAY_JWT_PUBLIC_KEY_FILE")
    if any(a in PUBLIC_KEY_ALGORITHMS for a in algorithms) and not provider \
            and public_key_file is None:
        raise ConfigError(
            "GATEWAY_JWT_PUBLIC_KEY_FILE: required by the public-key algorithms in"
            f" GATEWAY_JWT_ALGORITHMS ({','.join(algorithms)}), unless the keys come from"
            " GATEWAY_JWT_JWKS_URL or GATEWAY_OIDC_ISSUER"
        )
    if public_key_file is not None and not public_key_file.is_file():
        raise ConfigError(f"GATEWAY_JWT_PUBLIC_KEY_FILE: no such file {str(public_key_file)!r}")

    secret_text = _get(env, "GATEWAY_JWT_SECRET")
    secret_file = _path(env, "GATEWAY_JWT_SECRET_FILE")
    if secret_text and secret_file:
        raise ConfigError("GATEWAY_JWT_SECRET: set either it or GATEWAY_JWT_SECRET_FILE, not both")
    if secret_file is not None and not secret_file.is_file():
        raise ConfigError(f"GATEWAY_JWT_SECRET_FILE: no such file {str(secret_file)!r}")

    log_format = (_get(env, "GATEWAY_LOG_FORMAT") or "text").lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"GATEWAY_LOG_FORMAT: expected text or json, got {log_format!r}")

    rate_text = _get(env, "GATEWAY_RATE_LIMIT")
    rate_limit = None
    if rate_text and rate_text.lower() != "off":
        rate_limit = _rate_limit(rate_text, "GATEWAY_RATE_LIMIT")

    balancing = _get(env, "GATEWAY_BALANCING") or "round_robin"
    if balancing not in STRATEGIES:
        raise ConfigError(f"GATEWAY_BALANCING: expected one of {', '.join(STRATEGIES)},"
                          f" got {balancing!r}")

    cpu_affinity = (_get(env, "GATEWAY_CPU_AFFINITY") or "auto").lower()
    if cpu_affinity not in ("auto", "off"):
        raise ConfigError(f"GATEWAY_CPU_AFFINITY: expected auto or off, got {cpu_affinity!r}")

    on_error = (_get(env, "GATEWAY_RATE_LIMIT_ON_ERROR") or "open").lower()
    if on_error not in ("open", "closed"):
        raise ConfigError(f"GATEWAY_RATE_LIMIT_ON_ERROR: expected open or closed, got {on_error!r}")

    node_id = _get(env, "GATEWAY_NODE_ID") or secrets.token_hex(6)
    if not _NODE_ID_RE.match(node_id):
        raise ConfigError("GATEWAY_NODE_ID: expected 1 to 64 letters, digits, '.', '_' or '-',"
                          f" got {node_id!r}")

    failure_text = _get(env, "GATEWAY_AUTH_FAILURE_LIMIT") or DEFAULT_AUTH_FAILURE_LIMIT
    auth_failure_limit = (None if failure_text.lower() == "off"
                          else _rate_limit(failure_text, "GATEWAY_AUTH_FAILURE_LIMIT"))
    max_connections = _int(env, "GATEWAY_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1, 1_000_000)
    if max_connections <= threads:
        raise ConfigError(f"GATEWAY_MAX_CONNECTIONS: must be more than GATEWAY_THREADS ({threads}),"
                          f" so that connections can wait between requests; got {max_connections}")

    registration_key_file = _path(env, "GATEWAY_REGISTRATION_KEY_FILE")
    if registration_key_file is not None and not registration_key_file.is_file():
        raise ConfigError("GATEWAY_REGISTRATION_KEY_FILE: no such file "
                          f"{str(registration_key_file)!r}")

    ca_bundle = _get(env, "GATEWAY_UPSTREAM_CA_BUNDLE")
    if ca_bundle and not Path(ca_bundle).is_file():
        raise ConfigError(f"GATEWAY_UPSTREAM_CA_BUNDLE: no such file {ca_bundle!r}")
    upstream_timeout = (_float(env, "GATEWAY_UPSTREAM_TIMEOUT", 0.0, 0.01, 3600.0)
                        if _get(env, "GATEWAY_UPSTREAM_TIMEOUT") else None)

    return Settings(
        bind=bind,
        workers=workers,
        threads=threads,
        data_dir=data_dir,
        store=store,
        jwt_secret=secret_text.encode() if secret_text else None,
        jwt_secret_file=secret_file,
        jwt_algorithms=algorithms,
        jwt_public_key_file=public_key_file,
        jwt_private_key_file=_path(env, "GATEWAY_JWT_PRIVATE_KEY_FILE"),
        jwt_issuer=_get(env, "GATEWAY_JWT_ISSUER"),
        jwt_audience=_get(env, "GATEWAY_JWT_AUDIENCE"),
        jwt_leeway=_float(env, "GATEWAY_JWT_LEEWAY", 0.0, 0.0, 3600.0),
        jwt_jwks_url=jwks_url,
        oidc_issuer=oidc_issuer,
        jwks_refresh=_float(env, "GATEWAY_JWKS_REFRESH", DEFAULT_JWKS_REFRESH, 1.0, 86400.0),
        jwks_cooldown=_float(env, "GATEWAY_JWKS_COOLDOWN", DEFAULT_JWKS_COOLDOWN, 0.0, 3600.0),
        jwks_timeout=_float(env, "GATEWAY_JWKS_TIMEOUT", DEFAULT_JWKS_TIMEOUT, 0.1, 30.0),
        admin_token=_get(env, "GATEWAY_ADMIN_TOKEN"),
        registration_key_file=registration_key_file,
        admin_allow=_networks(env, "GATEWAY_ADMIN_ALLOW", "127.0.0.0/8,::1"),
        trusted_proxies=_networks(env, "GATEWAY_TRUSTED_PROXIES", ""),
        connect_timeout=_float(env, "GATEWAY_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT, 0.01, 600),
        read_timeout=_float(env, "GATEWAY_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, 0.01, 3600),
        max_body_bytes=_int(env, "GATEWAY_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, 0, 2**40),
        upstream_ca_bundle=ca_bundle,
        upstream_timeout=upstream_timeout,
        upstream_deny=_networks(env, "GATEWAY_UPSTREAM_DENY", ""),
        fast_paths=_fast_paths(env),
        rate_limit=rate_limit,
        log_format=log_format,
        balancing=balancing,
        cpu_affinity=cpu_affinity,
        ejection_seconds=_float(env, "GATEWAY_EJECTION_SECONDS", 30.0, 0.1, 3600.0),
        rate_limit_fail_open=on_error == "open",
        refresh_interval=_float(env, "GATEWAY_REFRESH_INTERVAL", 0.1, 0.01, 1.0),
        node_id=node_id,
        auth_failure_limit=auth_failure_limit,
        client_header_timeout=_float(env, "GATEWAY_CLIENT_HEADER_TIMEOUT",
                                     DEFAULT_CLIENT_HEADER_TIMEOUT, 0.1, 3600.0),
        client_body_timeout=_float(env, "GATEWAY_CLIENT_BODY_TIMEOUT",
                                   DEFAULT_CLIENT_BODY_TIMEOUT, 0.1, 3600.0),
        max_connections=max_connections,
    )


def read_or_create_secret(settings: Settings) -> bytes:
    """Return the HMAC secret: configured, read from its file, or generated once (mode 0600).

    Creation is atomic (``O_EXCL``), so several processes racing to create it agree on one key.
    """
    if settings.jwt_secret is not None:
        return settings.jwt_secret
    return _read_or_create_key(settings.secret_path, settings.jwt_secret_file is None,
                               "GATEWAY_JWT_SECRET_FILE")


def read_or_create_registration_key(settings: Settings) -> bytes:
    """The key registration credentials are signed with: ``GATEWAY_REGISTRATION_KEY_FILE``, or
    generated once at ``<data dir>/registration-key`` (mode 0600). Distinct from the JWT
    secret, so no token a client holds is ever a registration credential."""
    return _read_or_create_key(settings.registration_key_path,
                               settings.registration_key_file is None,
                               "GATEWAY_REGISTRATION_KEY_FILE")


def _read_or_create_key(path: Path, generate: bool, variable: str) -> bytes:
    if generate and not path.exists():
        # Write a temporary file, then link it into place: the link fails if another process
        # won the race, and nobody ever reads a half-written key.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {str(path)!r}: {exc}") from None
    if not secret:
        raise ConfigError(f"{variable}: {str(path)!r} is empty")
    return secret
