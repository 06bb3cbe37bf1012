"""The gateway's settings: their defaults, the tables of what each may be, and
:class:`Settings`, the validated configuration (parsed by :mod:`~gateway_app.config`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .ratelimit import RateLimit

#: Default seconds to wait for an upstream to accept a connection.
DEFAULT_CONNECT_TIMEOUT = 2.0
#: Default seconds to wait for an upstream's answer (between bytes).
DEFAULT_READ_TIMEOUT = 30.0
#: Request bodies larger than this get 413.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
#: Default seconds a client has to send a whole request head (nginx's client_header_timeout).
DEFAULT_CLIENT_HEADER_TIMEOUT = 60.0
#: Default seconds a client may leave between two reads of its request body (nginx's
#: client_body_timeout); also the longest a write of the response to it may wait.
DEFAULT_CLIENT_BODY_TIMEOUT = 60.0
#: Default client connections one worker holds at most (gunicorn's worker_connections).
DEFAULT_MAX_CONNECTIONS = 1000
#: The fast paths into http.client's, urllib3's and prometheus_client's internals (see
#: gateway_app/fastpaths.py).
FAST_PATH_NAMES = ("kernel_timeouts", "header_lines", "header_block", "histogram_batches")
#: Algorithms the verifier knows; each is either HMAC (a secret) or public-key (a PEM file).
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: The allow-list when an identity provider is configured and GATEWAY_JWT_ALGORITHMS is not:
#: every public-key algorithm (each provider key is bound to the algorithms its type fits).
PROVIDER_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                       "ES256", "ES384", "ES512", "EdDSA")
#: Seconds between background refreshes of the provider's keys (unless its Cache-Control says
#: otherwise, within bounds: see :mod:`gateway_app.jwks`).
DEFAULT_JWKS_REFRESH = 600.0
#: Seconds an unknown ``kid`` must wait after the last fetch it caused, per worker.
DEFAULT_JWKS_COOLDOWN = 30.0
#: Seconds one fetch from the provider may take, all of it (connect, answer, body).
DEFAULT_JWKS_TIMEOUT = 3.0
#: Provider URLs longer than this are refused.
MAX_PROVIDER_URL = 2048
#: HMAC secrets shorter than this get a warning at start (RFC 7518 section 3.2).
MIN_SECRET_BYTES = 32
#: Requests refused for their token, per client address: past it, 429 instead of 401.
DEFAULT_AUTH_FAILURE_LIMIT = "10/second, burst=50"
#: Load-balancing strategies a policy (or GATEWAY_BALANCING) may name.
STRATEGIES = ("round_robin", "least_in_flight", "random")


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one gateway."""

    bind: str = "127.0.0.1:8080"
    workers: int = 2
    threads: int = 16
    data_dir: Path = Path("var")
    store: str = ""
    jwt_secret: bytes | None = None
    jwt_secret_file: Path | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_public_key_file: Path | None = None
    jwt_private_key_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway: float = 0.0
    #: The identity provider's key set, given (GATEWAY_JWT_JWKS_URL) or to be discovered
    #: from its issuer (GATEWAY_OIDC_ISSUER); at most one of them is set.
    jwt_jwks_url: str | None = None
    oidc_issuer: str | None = None
    jwks_refresh: float = DEFAULT_JWKS_REFRESH
    jwks_cooldown: float = DEFAULT_JWKS_COOLDOWN
    jwks_timeout: float = DEFAULT_JWKS_TIMEOUT
    admin_token: str | None = None
    #: The key registration credentials are signed with (generated in the data dir if unset).
    registration_key_file: Path | None = None
    admin_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    upstream_ca_bundle: str | None = None
    #: Seconds one upstream exchange may take in all, retries included, from the first connect
    #: to the response head (and the body read before answering); ``None``: connect + read
    #: timeout of the service.
    upstream_timeout: float | None = None
    #: Networks no upstream connection goes to, besides addresses.REFUSED_RANGES.
    upstream_deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: The fast paths to use, when the installed libraries have what each relies on.
    fast_paths: frozenset[str] = frozenset(FAST_PATH_NAMES)
    rate_limit: RateLimit | None = None
    log_format: str = "text"
    #: Load balancing for services whose policy names none.
    balancing: str = "round_robin"
    #: ``auto``: with one worker per available CPU, each worker runs on a CPU of its own.
    cpu_affinity: str = "auto"
    #: Seconds an instance is ejected after consecutive failures (doubling, capped at 10x).
    ejection_seconds: float = 30.0
    #: When the shared rate-limit state cannot be reached: allow (True) or refuse requests.
    rate_limit_fail_open: bool = True
    #: Seconds between two looks at the store's change counter, per worker.
    refresh_interval: float = 0.1
    #: This gateway's name in the ``Via`` header it adds (one per gateway, all workers).
    node_id: str = "local"
    #: Requests refused for their token, per client address; ``None``: unlimited.
    auth_failure_limit: RateLimit | None = None
    #: Seconds a client has to send a request head, from its connection (or its first byte
    #: after a kept-alive pause).
    client_header_timeout: float = DEFAULT_CLIENT_HEADER_TIMEOUT
    #: Seconds a client may leave between two reads of its request body (and a response
    #: write may wait on it).
    client_body_timeout: float = DEFAULT_CLIENT_BODY_TIMEOUT
    #: Client connections one worker holds at most; past it, the oldest idle ones are closed.
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @property
    def uses_provider(self) -> bool:
        """Keys come from an identity provider (a JWKS URL or OIDC discovery)."""
        return self.jwt_jwks_url is not None or self.oidc_issuer is not None

    @property
    def uses_hmac(self) -> bool:
        return any(a in HMAC_ALGORITHMS for a in self.jwt_algorithms)

    @property
    def registration_key_path(self) -> Path:
        return self.registration_key_file or self.data_dir / "registration-key"

    @property
    def secret_path(self) -> Path:
        """Where the HMAC secret is read from (the generated one unless a file was named)."""
        return self.jwt_secret_file or self.data_dir / "jwt-secret"
