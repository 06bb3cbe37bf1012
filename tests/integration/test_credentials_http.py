"""Registration credentials and the audit log over real gunicorn with several workers
(issue 15, sections 4 and 5). Loopback stands in for "another host": GATEWAY_ADMIN_ALLOW is
set to a network the tests never call from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import requests

from tests.support import READY_TIMEOUT, ROOT, free_port, wait_for

ELSEWHERE = "192.0.2.0/24"  # TEST-NET-1: nobody here calls from it
ADMIN = "admin-token-for-tests-0123456789abcdef"


def admin(method: str, url: str, **kwargs) -> requests.Response:
    return requests.request(method, url, headers={"Authorization": f"Bearer {ADMIN}"},
                            timeout=10, **kwargs)


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "gateway_app.cli", *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=30)


def test_hello_service_registers_with_a_credential_scoped_to_it(start_gateway):
    gateway = start_gateway(GATEWAY_WORKERS=3, GATEWAY_ADMIN_ALLOW=ELSEWHERE,
                            GATEWAY_ADMIN_TOKEN=ADMIN)
    minted = cli("token", "--register", "hello_service", "--ttl", "600", env=gateway.env)
    assert minted.returncode == 0, minted.stderr
    credential = minted.stdout.strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    # This checkout's gateway_app, whatever the venv has installed (a script's sys.path starts
    # at its own directory, not the working directory).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    service = subprocess.Popen(
        [sys.executable, "examples/hello_service.py", "--gateway", gateway.url,
         "--port", str(port), "--ttl", "3"],
        cwd=ROOT, env={**env, "GATEWAY_REGISTRATION_TOKEN": credential},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def registered():
            found = admin("GET", gateway.url + "/_gateway/services/hello_service")
            return found.status_code == 200 and found.json()["instances"]

        wait_for(registered, timeout=READY_TIMEOUT, what="hello_service to register itself")
        time.sleep(3.5)  # its lease (3 s) was renewed by heartbeats with the credential
        assert registered()
        # The same credential reaches nothing else, on any worker.
        bearer = {"Authorization": f"Bearer {credential}", "Connection": "close"}
        for _ in range(6):
            other = requests.post(gateway.url + "/register_service",
                                  data="orders,http://127.0.0.1:1", headers=bearer, timeout=5)
            assert other.status_code == 403
            policy = requests.put(gateway.url + "/_gateway/services/hello_service/policy",
                                  json={"auth": "none"}, headers=bearer, timeout=5)
            assert policy.status_code == 403
    finally:
        service.send_signal(signal.SIGTERM)
        output = service.communicate(timeout=15)[0]
    assert service.returncode == 0, output  # it deregistered with its credential
    assert admin("GET", gateway.url + "/_gateway/services/hello_service").status_code == 404
    assert requests.post(gateway.url + "/register_service", data="hello_service,http://x:1",
                         timeout=5).status_code == 401  # and without one: refused

    log = gateway.log()
    assert "action=register service=hello_service" in log
    assert "actor=\"registration registration:hello_service " in log
    assert "action=heartbeat" in log and "action=deregister" in log
    assert "status=403 error=forbidden" in log
    assert credential not in log and ADMIN not in log


def test_a_revocation_reaches_every_worker_within_a_second(start_gateway):
    gateway = start_gateway(GATEWAY_WORKERS=3, GATEWAY_ADMIN_ALLOW=ELSEWHERE,
                            GATEWAY_ADMIN_TOKEN=ADMIN)
    minted = admin("POST", gateway.url + "/_gateway/registration-tokens",
                   json={"services": ["svc"], "sub": "svc-deployer"}).json()
    bearer = {"Authorization": f"Bearer {minted['token']}", "Connection": "close"}

    def register() -> int:
        return requests.post(gateway.url + "/register_service", data="svc,http://127.0.0.1:9",
                             headers=bearer, timeout=5).status_code

    assert {register() for _ in range(9)} <= {200, 201}
    revoked = cli("revoke", minted["id"], "--url", gateway.url,
                  env={"GATEWAY_ADMIN_TOKEN": ADMIN})
    assert revoked.returncode == 0, revoked.stderr
    done = time.monotonic()
    time.sleep(1.0)
    assert time.monotonic() - done < 1.5
    assert {register() for _ in range(12)} == {401}
    assert 'actor="admin token"' in gateway.log() and "action=revoke_registration_token" \
        in gateway.log()


def test_the_seed_still_registers_from_loopback(gateway, upstream):
    assert gateway.register("hello_service", upstream.address).status_code == 201


def test_a_revocation_on_one_node_reaches_the_other_within_a_second(start_gateway, space,
                                                                    tmp_path):
    """Two gateways over one Redis, sharing the registration key: a credential revoked through
    one is refused by every worker of the other within the second."""
    key = tmp_path / "registration-key"
    key.write_text("k" * 64)
    key.chmod(0o600)
    settings = dict(GATEWAY_STORE=space.url, GATEWAY_ADMIN_ALLOW=ELSEWHERE,
                    GATEWAY_ADMIN_TOKEN=ADMIN, GATEWAY_REGISTRATION_KEY_FILE=str(key))
    one = start_gateway(data_dir=tmp_path / "a", wait=False, **settings)
    two = start_gateway(data_dir=tmp_path / "b", wait=False, **settings)
    one.wait_ready()
    two.wait_ready()
    minted = admin("POST", one.url + "/_gateway/registration-tokens",
                   json={"services": ["svc"], "sub": "svc-deployer"}).json()
    bearer = {"Authorization": f"Bearer {minted['token']}", "Connection": "close"}

    def register(gateway) -> int:
        return requests.post(gateway.url + "/register_service", data="svc,http://127.0.0.1:9",
                             headers=bearer, timeout=5).status_code

    assert {register(two) for _ in range(6)} <= {200, 201}  # the other node honours it
    assert admin("DELETE", f"{two.url}/_gateway/registration-tokens/{minted['id']}"
                 ).status_code == 200
    done = time.monotonic()
    time.sleep(1.0)  # the contract's second, then every worker of both nodes must refuse
    assert time.monotonic() - done < 1.5
    assert {register(one) for _ in range(8)} == {401}
    assert {register(two) for _ in range(8)} == {401}
