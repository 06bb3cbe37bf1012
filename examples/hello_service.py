#!/usr/bin/env python3
"""The seed's hello_service: a tiny upstream that registers itself with the gateway.

It binds its port, POSTs ``NAME,http://HOST:PORT`` to ``/register_service`` and then
answers every GET/HEAD with ``{"message": "Hello from the Service!"}``. On SIGTERM or
SIGINT it deregisters (POST ``/deregister_service``, same body), stops and exits 0.

Standard library only, so it runs with any Python 3.11+.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = json.dumps({"message": "Hello from the Service!"}).encode()
TIMEOUT_S = 5


def log(message: str) -> None:
    print(f"[hello_service] {message}", flush=True)


class HelloHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the gateway can reuse connections

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        # A GET may carry a body; drain it so the next request on this connection parses.
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if with_body:
            self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        log(f"{self.address_string()} {format % args}")


def _post_text(url: str, body: str) -> tuple[int, str]:
    """POST a text/plain body; return (status, response text). Raises OSError if unreachable."""
    # The URL's scheme is checked (http/https only) in parse_args, hence the two noqa.
    headers = {"Content-Type": "text/plain"}
    request = urllib.request.Request(url, data=body.encode(), headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:  # 4xx/5xx: the gateway answered, keep its words
        return err.code, err.read().decode(errors="replace")


def register(gateway: str, name: str, address: str) -> None:
    """Register NAME at ADDRESS with the gateway; raise RuntimeError with its answer on failure."""
    url = f"{gateway}/register_service"
    try:
        status, text = _post_text(url, f"{name},{address}")
    except OSError as err:
        raise RuntimeError(f"cannot reach the gateway at {url}: {err}") from err
    if status not in (200, 201):
        raise RuntimeError(f"gateway refused the registration (HTTP {status}): {text.strip()}")
    log(f"registered {name} at {address} with {gateway} (HTTP {status}): {text.strip()}")


def deregister(gateway: str, name: str, address: str) -> None:
    """Remove NAME at ADDRESS from the gateway; report (not raise) if that fails."""
    url = f"{gateway}/deregister_service"
    try:
        status, text = _post_text(url, f"{name},{address}")
    except OSError as err:
        log(f"could not deregister, gateway unreachable at {url}: {err}")
        return
    if status == 200:
        log(f"deregistered {name} at {address} (HTTP {status}): {text.strip()}")
    else:
        log(f"gateway did not deregister {name} (HTTP {status}): {text.strip()}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gateway",
        default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
        help="gateway base URL (env GATEWAY_URL; default %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=9090, help="port to bind (%(default)s)")
    parser.add_argument("--name", default="hello_service", help="service name (%(default)s)")
    args = parser.parse_args()
    if not args.gateway.startswith(("http://", "https://")):
        parser.error(f"--gateway must be an http(s) URL, got {args.gateway!r}")
    return args


def main() -> int:
    args = parse_args()
    gateway = args.gateway.rstrip("/")
    address = f"http://{args.host}:{args.port}"

    # SIGINT/SIGTERM are blocked here (and in every thread started below) and picked up by
    # sigwait() at the end, so a signal never interrupts the code at an arbitrary point.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)

    try:
        server = ThreadingHTTPServer((args.host, args.port), HelloHandler)
    except OSError as err:
        log(f"cannot listen on {args.host}:{args.port}: {err}")
        return 1
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log(f"listening on {address}")

    try:
        register(gateway, args.name, address)
    except RuntimeError as err:
        log(f"registration failed: {err}")
        server.shutdown()
        server.server_close()
        return 1

    received = signal.sigwait(stop_signals)
    log(f"got {signal.Signals(received).name}, shutting down")
    deregister(gateway, args.name, address)
    server.shutdown()
    server.server_close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
