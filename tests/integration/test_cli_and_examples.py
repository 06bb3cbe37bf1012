"""The ``gateway`` command and the seed's examples, against a real gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import requests

from tests.support import READY_TIMEOUT, ROOT, free_port, wait_for


def gateway_cmd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway_app.cli", *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=30)


def test_cli_token_register_services_deregister(gateway, upstream):
    env = gateway.env | {"GATEWAY_JWT_SECRET": gateway.env.get("GATEWAY_JWT_SECRET", "")}
    url = ["--url", gateway.url]

    registered = gateway_cmd("register", "svc", upstream.address + "/", "--ttl", "60", *url,
                             env=env)
    assert registered.returncode == 0, registered.stderr
    assert f"at {upstream.address}" in registered.stdout

    listed = gateway_cmd("services", *url, env=env)
    assert "svc" in listed.stdout and upstream.address in listed.stdout

    token = gateway_cmd("token", "--sub", "cli-user", "--claim", "role=admin", env=env)
    assert token.returncode == 0 and token.stderr == ""
    assert token.stdout.count(".") == 2 and token.stdout.strip() == token.stdout.rstrip("\n")
    gateway.wait_routable("/svc/", {"Authorization": f"Bearer {token.stdout.strip()}"})
    echoed = gateway.fresh_get("/svc/", {"Authorization": f"Bearer {token.stdout.strip()}"})
    assert echoed.json()["headers"]["X-Authenticated-Subject"] == "cli-user"

    removed = gateway_cmd("deregister", "svc", *url, env=env)
    assert removed.returncode == 0 and "deregistered svc" in removed.stdout
    again = gateway_cmd("deregister", "svc", *url, env=env)
    assert again.returncode == 1
    assert "404 service_not_found" in again.stderr


def test_cli_shows_gateway_errors_plainly(gateway):
    bad = gateway_cmd("register", "svc", "http://169.254.169.254", "--url", gateway.url)
    assert bad.returncode == 1
    assert bad.stderr.startswith("gateway: 400 bad_request: ")
    assert "169.254.169.254 is link-local" in bad.stderr
    unreachable = gateway_cmd("services", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "cannot reach the gateway" in unreachable.stderr


def test_cli_token_uses_the_gateway_configuration(tmp_path):
    import jwt

    env = {"GATEWAY_DATA_DIR": str(tmp_path), "GATEWAY_JWT_ISSUER": "me", "GATEWAY_JWT_AUDIENCE":
           "api"}
    out = gateway_cmd("token", "--sub", "x", "--ttl", "120", env=env)
    assert out.returncode == 0, out.stderr
    secret = (tmp_path / "jwt-secret").read_bytes().strip()  # generated like the gateway does
    claims = jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"], audience="api")
    assert (claims["iss"], claims["sub"], claims["exp"] - claims["iat"]) == ("me", "x", 120)
    refused = gateway_cmd("token", "--sub", "x", "--claim", "exp=1", env=env)
    assert refused.returncode != 0


def test_seed_story_hello_service_and_client(start_gateway):
    gateway = start_gateway(GATEWAY_JWT_SECRET="secret_key", GATEWAY_JWT_ISSUER="my_issuer")
    port = free_port()
    service = subprocess.Popen(
        [sys.executable, "examples/hello_service.py", "--gateway", gateway.url,
         "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def registered():
            found = requests.get(gateway.url + "/_gateway/services/hello_service", timeout=5)
            return found.status_code == 200 and found.json()["instances"][0]["address"] == \
                f"http://127.0.0.1:{port}"

        wait_for(registered, timeout=READY_TIMEOUT, what="hello_service to register itself")
        env = {"GATEWAY_JWT_SECRET": "secret_key", "GATEWAY_JWT_ISSUER": "my_issuer"}
        import time

        import jwt
        seed_token = jwt.encode({"sub": "1234567890", "iss": "my_issuer",
                                 "exp": int(time.time()) + 60}, "secret_key", algorithm="HS256")
        gateway.wait_routable("/hello_service", {"Authorization": seed_token})
        client = subprocess.run(
            [sys.executable, "examples/client.py", "--gateway", gateway.url], cwd=ROOT,
            env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
        assert client.returncode == 0, client.stdout + client.stderr
        assert 'Response Body: {"message": "Hello from the Service!"}' in client.stdout
        assert "Response: 401" in client.stdout
    finally:
        service.send_signal(signal.SIGTERM)
        output = service.communicate(timeout=15)[0]
    assert service.returncode == 0, output
    assert requests.get(gateway.url + "/_gateway/services/hello_service",
                        timeout=5).status_code == 404
