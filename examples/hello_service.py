#!/usr/bin/env python3
"""The seed's hello_service: a tiny upstream that registers itself with the gateway.

It binds its port, registers through :mod:`gateway_app.registration` (by default with the
seed's body ``NAME,http://HOST:PORT``; with ``--ttl`` it holds a lease and heartbeats) and
then answers every GET/HEAD with ``{"message": "Hello from the Service!"}``. On SIGTERM or
SIGINT it deregisters, stops and exits 0. Run it with the project's venv:
``.venv/bin/python examples/hello_service.py``.

From the gateway's machine (loopback) it needs no credential, as in the seed. From another
host, give it a registration credential for its service in ``GATEWAY_REGISTRATION_TOKEN``
(``GATEWAY_REGISTRATION_TOKEN=$(gateway token --register hello_service)``): it may then
register, renew and remove ``hello_service`` instances, and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gateway_app.registration import RegistrationError, SelfRegistration

BODY = json.dumps({"message": "Hello from the Service!"}).encode()


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
    parser.add_argument("--ttl", type=float, default=None,
                        help="hold a lease of this many seconds, renewed every ttl/3 "
                             "(default: the seed's registration, no lease)")
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

    # Without --ttl this sends the seed's text body "hello_service,http://127.0.0.1:9090".
    registration = SelfRegistration(gateway, args.name, address, ttl=args.ttl)
    try:
        instance = registration.start()
    except RegistrationError as err:
        log(f"registration failed: {err}")
        server.shutdown()
        server.server_close()
        return 1
    lease = f"a {args.ttl:g} s lease renewed every {args.ttl / 3:g} s" if args.ttl else "no lease"
    log(f"registered {args.name} at {address} with {gateway} as instance {instance['id']} "
        f"({lease})")

    received = signal.sigwait(stop_signals)
    log(f"got {signal.Signals(received).name}, shutting down")
    registration.stop()
    log(f"deregistered {args.name} at {address}")
    server.shutdown()
    server.server_close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
