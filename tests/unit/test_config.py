"""Configuration is validated at start, with errors naming the variable (README: Configuration)."""

import stat

import pytest

from gateway_app.config import ConfigError, load_settings, read_or_create_secret


@pytest.mark.parametrize("env, variable", [
    ({"GATEWAY_WORKERS": "zero"}, "GATEWAY_WORKERS"),
    ({"GATEWAY_THREADS": "0"}, "GATEWAY_THREADS"),
    ({"GATEWAY_STORE": "postgres://x"}, "GATEWAY_STORE"),
    ({"GATEWAY_STORE": "memory://", "GATEWAY_WORKERS": "2"}, "GATEWAY_STORE"),
    ({"GATEWAY_JWT_ALGORITHMS": "none"}, "GATEWAY_JWT_ALGORITHMS"),
    ({"GATEWAY_JWT_ALGORITHMS": "RS256"}, "GATEWAY_JWT_PUBLIC_KEY_FILE"),
    ({"GATEWAY_ADMIN_ALLOW": "10.0.0.0/8,bogus"}, "GATEWAY_ADMIN_ALLOW"),
    ({"GATEWAY_CONNECT_TIMEOUT": "-1"}, "GATEWAY_CONNECT_TIMEOUT"),
    ({"GATEWAY_READ_TIMEOUT": "soon"}, "GATEWAY_READ_TIMEOUT"),
    ({"GATEWAY_LOG_FORMAT": "xml"}, "GATEWAY_LOG_FORMAT"),
    ({"GATEWAY_RATE_LIMIT": "lots"}, "GATEWAY_RATE_LIMIT"),
    ({"GATEWAY_RATE_LIMIT": "9" * 400 + "/second"}, "GATEWAY_RATE_LIMIT"),
    ({"GATEWAY_JWT_SECRET_FILE": "/nonexistent/secret"}, "GATEWAY_JWT_SECRET_FILE"),
    ({"GATEWAY_BIND": "8080"}, "GATEWAY_BIND"),
    ({"GATEWAY_CPU_AFFINITY": "yes"}, "GATEWAY_CPU_AFFINITY"),
    ({"GATEWAY_CLIENT_HEADER_TIMEOUT": "0"}, "GATEWAY_CLIENT_HEADER_TIMEOUT"),
    ({"GATEWAY_CLIENT_BODY_TIMEOUT": "forever"}, "GATEWAY_CLIENT_BODY_TIMEOUT"),
    ({"GATEWAY_MAX_CONNECTIONS": "many"}, "GATEWAY_MAX_CONNECTIONS"),
    ({"GATEWAY_MAX_CONNECTIONS": "16"}, "GATEWAY_MAX_CONNECTIONS"),  # not more than the threads
    ({"GATEWAY_UPSTREAM_TIMEOUT": "0"}, "GATEWAY_UPSTREAM_TIMEOUT"),
    ({"GATEWAY_UPSTREAM_TIMEOUT": "a while"}, "GATEWAY_UPSTREAM_TIMEOUT"),
    ({"GATEWAY_UPSTREAM_DENY": "10.0.0.0/8,metadata"}, "GATEWAY_UPSTREAM_DENY"),
    ({"GATEWAY_FAST_PATHS": "turbo"}, "GATEWAY_FAST_PATHS"),
    ({"GATEWAY_FAST_PATHS": "header_lines,warp"}, "GATEWAY_FAST_PATHS"),
])
def test_bad_values_name_their_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        load_settings(env)


def test_memory_store_with_many_workers_says_why():
    with pytest.raises(ConfigError, match="each worker would see a different registry"):
        load_settings({"GATEWAY_STORE": "memory://", "GATEWAY_WORKERS": "4"})


def test_defaults():
    settings = load_settings({})
    assert settings.bind == "127.0.0.1:8080"
    assert (settings.workers, settings.threads) == (2, 16)
    assert settings.store == "sqlite:///var/registry.db"
    assert settings.jwt_algorithms == ("HS256",)
    assert (settings.connect_timeout, settings.read_timeout) == (2.0, 30.0)
    assert settings.max_body_bytes == 10 * 1024 * 1024
    assert settings.rate_limit is None
    assert (settings.client_header_timeout, settings.client_body_timeout) == (60.0, 60.0)
    assert settings.max_connections == 1000


def test_upstream_deny():
    assert load_settings({}).upstream_deny == ()
    settings = load_settings({"GATEWAY_UPSTREAM_DENY": "10.0.0.0/8, fd12::/16"})
    assert [str(n) for n in settings.upstream_deny] == ["10.0.0.0/8", "fd12::/16"]


def test_fast_paths():
    assert load_settings({}).fast_paths == {"kernel_timeouts", "header_lines", "header_block",
                                            "histogram_batches"}
    assert load_settings({"GATEWAY_FAST_PATHS": "OFF"}).fast_paths == frozenset()
    assert load_settings({"GATEWAY_FAST_PATHS": "header_lines"}).fast_paths == {"header_lines"}


def test_upstream_timeout():
    assert load_settings({}).upstream_timeout is None  # connect + read timeout of the service
    assert load_settings({"GATEWAY_UPSTREAM_TIMEOUT": "12.5"}).upstream_timeout == 12.5


def test_generated_secret_is_created_once_with_mode_0600(tmp_path):
    settings = load_settings({"GATEWAY_DATA_DIR": str(tmp_path)})
    first = read_or_create_secret(settings)
    assert len(first) >= 32
    assert read_or_create_secret(settings) == first
    mode = (tmp_path / "jwt-secret").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
