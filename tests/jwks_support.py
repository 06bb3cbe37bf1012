"""A real identity provider on loopback for tests: keys made with ``cryptography``, a JWKS and
an OIDC discovery document served over HTTP, and a count of the fetches it answered."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support import QuickShutdown

#: What each kind of key signs with.
ALGORITHMS = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}
_RSA_KEYS: list[Any] = []  # 2048-bit RSA keys take a while to make: a few, reused


def new_private_key(kind: str) -> Any:
    if kind == "RSA":
        if len(_RSA_KEYS) < 4:
            _RSA_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
            return _RSA_KEYS[-1]
        return _RSA_KEYS[secrets.randbelow(len(_RSA_KEYS))]
    if kind == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "OKP":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def public_jwk(kind: str, private_key: Any, **members: Any) -> dict[str, Any]:
    to_jwk = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}[kind].to_jwk
    jwk = to_jwk(private_key.public_key(), as_dict=True)
    jwk.update(members)
    return jwk


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: TCP_NODELAY, as real servers set it: without it the head and the body, written apart,
    #: wait on the peer's delayed ACK (about 40 ms a response on loopback).
    disable_nagle_algorithm = True
    server: KeyServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        provider = self.server
        path = self.path.split("?")[0]
        with provider.lock:
            provider.requests.append(path)
            if path == "/jwks.json":
                provider.fetches += 1
            elif path == "/.well-known/openid-configuration":
                provider.discoveries += 1
        if provider.delay:
            time.sleep(provider.delay)
        if provider.down:
            # Down: the connection is closed without an answer.
            self.close_connection = True
            self.connection.close()
            return
        if path == "/jwks.json":
            raw = provider.raw_jwks
            body = raw if raw is not None else json.dumps(provider.jwks()).encode()
            headers = [("Content-Type", "application/json")]
            if provider.cache_control:
                headers.append(("Cache-Control", provider.cache_control))
            self._send(provider.jwks_status, body, headers)
        elif path == "/.well-known/openid-configuration":
            doc = provider.discovery
            body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            self._send(200, body, [("Content-Type", "application/json")])
        elif path == "/redirect":
            self._send(302, b"", [("Location", provider.url + "/jwks.json")])
        elif path == "/big":
            self._send(200, b'{"keys": [' + b" " * (2 * 1024 * 1024) + b"]}",
                       [("Content-Type", "application/json")])
        else:
            self._send(404, b"not here", [])

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (a test of timeouts)
            self.close_connection = True


class KeyServer(QuickShutdown, ThreadingHTTPServer):
    """An identity provider on 127.0.0.1: ``/jwks.json``, ``/.well-known/openid-configuration``.

    ``add_key`` makes a key and publishes it; ``token`` signs with one; ``down`` makes every
    request fail; ``fetches`` counts the key set's fetches."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.jwks_url = self.url + "/jwks.json"
        self.issuer = self.url
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.fetches = 0
        self.discoveries = 0
        self.down = False
        self.delay = 0.0
        self.cache_control: str | None = None
        self.jwks_status = 200
        #: A body to serve instead of the key set (bytes), when set.
        self.raw_jwks: bytes | None = None
        #: kid -> (kind, private key, extra JWK members, published)
        self.keys: dict[str, tuple[str, Any, dict[str, Any], bool]] = {}
        self.discovery: Any = {"issuer": self.issuer, "jwks_uri": self.jwks_url}
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> KeyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()

    def add_key(self, kind: str = "RSA", kid: str | None = None, publish: bool = True,
                **members: Any) -> str:
        kid = kid or f"{kind.lower()}-{secrets.token_hex(4)}"
        self.keys[kid] = (kind, new_private_key(kind), members, publish)
        return kid

    def publish(self, kid: str, published: bool = True) -> None:
        kind, key, members, _ = self.keys[kid]
        self.keys[kid] = (kind, key, members, published)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(kind, key, kid=kid, **members)
                         for kid, (kind, key, members, published) in list(self.keys.items())
                         if published]}

    def token(self, kid: str, sub: str = "alice", ttl: float = 300, header_kid: Any = "same",
              algorithm: str | None = None, **claims: Any) -> str:
        kind, key, _, _ = self.keys[kid]
        now = int(time.time())
        payload = {"sub": sub, "iat": now, "exp": now + ttl, **claims}
        headers = {"kid": kid if header_kid == "same" else header_kid}
        if headers["kid"] is None:
            headers = {}
        return jwt.encode(payload, key, algorithm=algorithm or ALGORITHMS[kind], headers=headers)

    def fetch_count(self) -> int:
        with self.lock:
            return self.fetches
