"""A small upstream run as its own process, so tests can kill it: ``python -m tests.upstream_app
PORT``. Answers JSON naming its port; ``/status/N`` answers N; ``/slow/S`` waits S seconds."""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: TCP_NODELAY, as real servers set it: without it the head and the body, written apart,
    #: wait on the peer's delayed ACK (about 40 ms a response on loopback).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parts = self.path.split("?")[0].strip("/").split("/")
        status = 200
        if parts[0] == "status":
            status = int(parts[1])
        elif parts[0] == "slow":
            time.sleep(float(parts[1]))  # the slow upstream is what the test exercises
        body = json.dumps({"port": self.server.server_address[1], "path": self.path}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _answer


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # (socketserver's 5 drops SYNs in a burst on a loaded machine)


if __name__ == "__main__":
    server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
    print("ready", flush=True)
    server.serve_forever()
