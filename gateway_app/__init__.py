"""An API gateway: dynamic service registry, JWT checks, streaming forwarding.

``create_app`` builds one gateway: configuration, then the per-process state (registry,
token verifier, forwarder), then the blueprints and the JSON error handlers.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, request

from . import accesslog, audit, fastpaths
from .addresses import AddressPolicy
from .auth import TokenVerifier, load_public_key
from .config import (
    ConfigError,
    load_settings,
    read_or_create_registration_key,
    read_or_create_secret,
)
from .credentials import RegistrationCredentials
from .errors import register_error_handlers
from .forwarding import Forwarder
from .front import VIA_PREFIX, FrontDoor
from .health import HealthTracker
from .jwks import ProviderError, ProviderKeys
from .metrics import Metrics
from .prober import ActiveChecker
from .ratelimit import Limiter, SharedBuckets
from .registry import Registry
from .retries import RetryBudget
from .settings import MIN_SECRET_BYTES, Settings
from .stores import is_redis_url, open_store

__all__ = ["create_app", "GatewayState"]

log = logging.getLogger("gateway")


@dataclass
class GatewayState:
    """The per-process objects of one gateway, kept in ``app.extensions["gateway"]``."""

    settings: Settings
    registry: Registry
    verifier: TokenVerifier
    forwarder: Forwarder
    limiter: Limiter
    retries: RetryBudget
    #: The health of every instance, shared with the other workers (and nodes) through the
    #: store's health board.
    health: HealthTracker
    #: Keeps this process's health copies in sync, and probes.
    checker: ActiveChecker
    #: This gateway's name in the ``Via`` header of every forwarded request.
    pseudonym: str
    #: Mints and verifies registration credentials (scoped to services).
    credentials: RegistrationCredentials
    #: The Prometheus metrics (this worker records; a scrape reads every worker's).
    metrics: Metrics
    #: Set when this worker begins to stop (SIGTERM, or its exit): ``/_gateway/ready`` then
    #: answers 503, before anything is closed.
    stopping: bool = False

    def begin_shutdown(self) -> None:
        """Say "not ready" from now on; requests in flight and queued ones are still served."""
        self.stopping = True

    def not_ready_reason(self) -> str | None:
        """Why this worker should not be sent new requests, or ``None`` when it is ready."""
        if self.stopping:
            return "this worker is shutting down"
        return self.registry.not_ready_reason()

    def close(self) -> None:
        self.begin_shutdown()
        accesslog.flush()
        self.checker.stop()
        self.metrics.close()  # what its requests recorded since the last flush
        self.registry.close()
        self.health.close()
        self.forwarder.close()
        self.limiter.close()
        self.verifier.close()


class GatewayFlask(Flask):
    """Flask, for an app with no ``async`` views or hooks: Flask's default checks each view
    and hook for being a coroutine function on every call (four checks per proxied request)."""

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        return func


def build_verifier(settings: Settings, with_provider: bool = True) -> TokenVerifier:
    """The token verifier for ``settings``, warning once about a short HMAC secret.

    With an identity provider configured (and ``with_provider``), its keys are fetched here,
    before serving; :class:`~gateway_app.config.ConfigError` when it answers with something
    unusable. When it cannot be reached the gateway starts without them (see jwks.py)."""
    secret = read_or_create_secret(settings) if settings.uses_hmac else None
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        log.warning("the JWT secret is %d bytes; use at least %d (RFC 7518): anyone who can "
                    "guess it can mint tokens", len(secret), MIN_SECRET_BYTES)
        # We warned once here; PyJWT would warn again on every decode.
        from jwt.warnings import InsecureKeyLengthWarning

        warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
    public_keys = (load_public_key(settings.jwt_public_key_file, settings.jwt_algorithms)
                   if settings.jwt_public_key_file else None)
    provider = None
    if with_provider and settings.uses_provider:
        provider = ProviderKeys(settings)
        try:
            provider.load()
        except ProviderError as exc:
            variable = "GATEWAY_OIDC_ISSUER" if settings.oidc_issuer else "GATEWAY_JWT_JWKS_URL"
            raise ConfigError(f"{variable}: {exc}") from None
    return TokenVerifier(settings, secret, public_keys, provider)


def build_limiter(settings: Settings) -> Limiter:
    """The rate limiter: in Redis when the registry is (every node then shares each limit),
    else in a file shared by this machine's workers."""
    if is_redis_url(settings.store):
        from .redis_limiter import RedisLimiter
        from .stores.redis_client import parse_url

        return RedisLimiter(parse_url(settings.store), fail_open=settings.rate_limit_fail_open)
    return SharedBuckets(settings.data_dir / "ratelimit.buckets")


def _version() -> str:
    try:
        return importlib.metadata.version("gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Build a gateway from ``GATEWAY_*`` environment variables, then ``overrides``."""
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}
    env.update(overrides or {})
    settings = load_settings(env)

    # No app-wide static route: "/static/..." belongs to a service named "static". The
    # dashboard serves its own files under /_gateway/static/ (see dashboard.py).
    app = GatewayFlask(__name__, static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.merge_slashes = False  # "/svc//x" is forwarded as sent, not redirected
    app.url_map.strict_slashes = False

    from .proxy import RestConverter, ServiceNameConverter

    app.url_map.converters["service"] = ServiceNameConverter
    app.url_map.converters["rest"] = RestConverter

    store = open_store(settings.store)
    health = HealthTracker(store.make_health_board(), settings.ejection_seconds,
                           settings.node_id)
    registry = Registry(store, settings.refresh_interval, settings.balancing, health)
    # One transport for the traffic and the health probes alike.
    forwarder = Forwarder(pool_size=settings.threads, ca_bundle=settings.upstream_ca_bundle,
                          addresses=AddressPolicy(settings.upstream_deny, settings.bind),
                          fast_paths=settings.fast_paths)
    state = GatewayState(
        settings=settings,
        registry=registry,
        verifier=build_verifier(settings),
        forwarder=forwarder,
        limiter=build_limiter(settings),
        retries=RetryBudget(),
        health=health,
        checker=ActiveChecker(registry.snapshot, health, forwarder),
        pseudonym=VIA_PREFIX + settings.node_id,
        credentials=RegistrationCredentials(read_or_create_registration_key(settings)),
        metrics=Metrics(registry, _version(), batched_histograms="histogram_batches"
                        in fastpaths.available(settings.fast_paths)),
    )
    state.checker.start()
    state.metrics.start()
    if "gateway" in app.extensions:
        raise RuntimeError("a gateway is already registered on this app")
    app.extensions["gateway"] = state

    from . import admin, dashboard, proxy

    metrics = state.metrics
    started = metrics.started
    log_line = accesslog.line_writer(settings, metrics.finished)
    audit.configure()

    # The request's one view is made at the edge, before Flask routes (see front.py).
    app.wsgi_app = FrontDoor(app.wsgi_app, settings.trusted_proxies,  # type: ignore[method-assign]
                             settings.node_id)

    # One hook each way (Flask checks every hook function for being a coroutine, per request).
    @app.before_request
    def start_request() -> None:
        started()  # in flight until its response closes (the access log's callback)
        view = request.environ["gateway.view"]
        g.view = view
        if view.error is not None:  # refused at the edge: before routing, token or anything
            raise view.error

    @app.after_request
    def finish_response(response: Response) -> Response:
        view = g.view
        response.headers["X-Request-ID"] = view.request_id
        extra = view.extra_headers  # the rate limit's, on every proxied response
        if extra:
            response.headers.update(extra)
        return log_line(response)

    app.register_blueprint(admin.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(proxy.bp)
    register_error_handlers(app)
    return app
