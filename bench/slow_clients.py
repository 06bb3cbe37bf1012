"""make bench-slow: legitimate requests while slow and idle clients hold connections open.

Starts a gateway (``gunicorn -c gunicorn.conf.py wsgi:app``, as bench/run.sh does) and a small
upstream, registers it as service ``bench``, then for each kind of bad client and each count N
(10, 100, 1000 by default):

- ``slow-head``: N connections sending a request head a byte a second, never finishing it;
- ``slow-body``: N connections sending a complete head (a valid token, Content-Length 1000),
  then the body a byte a second;
- ``idle``: N connections that send nothing;
- ``linger``: N connections that each send a whole ``Connection: close`` request, then neither
  read the answer nor close (the legitimate requests start once all N are answered);

and, while they are open, sends a legitimate ``GET /bench/`` (with a token, on a new
connection) every 100 ms for ``--duration`` seconds. It reports the share of those that got a
200 within ``--timeout`` seconds, their p50 and p99, and whether the master killed a worker.
Traffic goes to 127.0.0.1 only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("slow-head", "slow-body", "idle", "linger")
BODY = b'{"message": "Hello from the Service!"}'


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.do_GET()


class UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the gateway cut a slow client's request short: expected here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_open_files(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Gateway:
    """A gateway started from ``root`` (its code and its gunicorn.conf.py)."""

    def __init__(self, root: Path, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log_path = workdir / "gateway.log"
        self.secret = secrets.token_urlsafe(36)
        gateway_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        gateway_env.update(env)
        gateway_env.update(GATEWAY_BIND=f"127.0.0.1:{self.port}",
                           GATEWAY_DATA_DIR=str(workdir / "data"),
                           GATEWAY_JWT_SECRET=self.secret)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=root, env=gateway_env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 86400}, self.secret,
                                algorithm="HS256")

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 5.0, token: bool = False) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Connection": "close"}
            if token:
                headers["Authorization"] = f"Bearer {self.token}"
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def wait_healthy(self, timeout: float) -> float | None:
        """Seconds until a health check answered 200, or ``None``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"the gateway exited:\n{self.log()[-3000:]}")
            try:
                if self.request("GET", "/_gateway/health", timeout=2) == 200:
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.1)
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


class Attackers:
    """N bad clients of one kind, kept by one thread: slow ones get a byte a second."""

    def __init__(self, gateway: Gateway, kind: str, count: int) -> None:
        self.gateway, self.kind = gateway, kind
        self.socks: list[socket.socket] = []
        self.failed = 0
        self.closed_by_server = 0
        self._stop = threading.Event()
        host = f"Host: 127.0.0.1:{gateway.port}\r\n"
        auth = f"Authorization: Bearer {gateway.token}\r\n"
        self.first = {
            "slow-head": f"GET /bench/ HTTP/1.1\r\n{host}X-Slow: ".encode(),
            "slow-body": (f"POST /bench/ HTTP/1.1\r\n{host}{auth}Content-Type: text/plain\r\n"
                          "Content-Length: 1000\r\n\r\n").encode(),
            "idle": b"",
            "linger": f"GET /_gateway/health HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode(),
        }[kind]
        for _ in range(count):
            try:
                sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=2)
                # a small receive buffer, so unread answers fill it as a slow reader's would
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                if self.first:
                    sock.sendall(self.first)
                sock.setblocking(False)
                self.socks.append(sock)
            except OSError:
                self.failed += 1
        self.thread = threading.Thread(target=self._dribble, daemon=True)
        self.thread.start()

    def _dribble(self) -> None:
        slow = self.kind in ("slow-head", "slow-body")
        while not self._stop.wait(1.0):
            if not slow:
                continue
            for sock in self.socks:
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    def wait_answered(self, timeout: float) -> float:
        """Wait until each connection has its answer waiting unread (the ``linger`` kind), so
        what is measured is the lingering, not the burst of N requests; seconds waited."""
        start = time.monotonic()
        selector = selectors.DefaultSelector()
        for sock in self.socks:
            selector.register(sock, selectors.EVENT_READ)
        pending = len(self.socks)
        while pending and time.monotonic() - start < timeout:
            for key, _ in selector.select(0.1):
                selector.unregister(key.fileobj)
                pending -= 1
        selector.close()
        return time.monotonic() - start

    def still_open(self) -> int:
        """How many the server has not closed (EOF or reset seen), without reading answers."""
        selector = selectors.DefaultSelector()
        for sock in self.socks:
            selector.register(sock, selectors.EVENT_READ)
        open_ = len(self.socks)
        for key, _ in selector.select(0):
            try:  # (an answer waits unread before the end: read it now, the run is over)
                while key.fileobj.recv(65536):
                    pass
                open_ -= 1  # the end
            except BlockingIOError:
                pass
            except OSError:
                open_ -= 1
        selector.close()
        return open_

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1)]


def legit_traffic(gateway: Gateway, duration: float, interval: float,
                  timeout: float) -> tuple[int, int, list[float]]:
    """A GET every ``interval`` seconds, each on its own thread and connection."""
    latencies: list[float] = []
    ok = 0
    lock = threading.Lock()

    def one() -> None:
        nonlocal ok
        start = time.monotonic()
        try:
            status = gateway.request("GET", "/bench/", timeout=timeout, token=True)
        except OSError:
            return
        if status == 200:
            with lock:
                ok += 1
                latencies.append(time.monotonic() - start)

    sent = 0
    with ThreadPoolExecutor(max_workers=int(timeout / interval) + 4) as pool:
        start = time.monotonic()
        while time.monotonic() - start < duration:
            pool.submit(one)
            sent += 1
            time.sleep(max(0.0, start + sent * interval - time.monotonic()))
    return ok, sent, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="counts of bad clients")
    parser.add_argument("--kinds", default=",".join(KINDS), help=",".join(KINDS))
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of legitimate traffic per run")
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between legitimate requests")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds a legitimate request may take to count as a success")
    parser.add_argument("--root", default=str(ROOT),
                        help="the gateway checkout to run (its code and gunicorn.conf.py)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "slow-clients.json"),
                        help="where to write the results")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    raise_open_files(max(sizes) + 1024)

    upstream = UpstreamServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{upstream.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}
    print(f"bench-slow: gateway from {args.root} (a new one per run); legitimate GET every"
          f" {args.interval * 1000:.0f} ms for {args.duration:g} s per run, {args.timeout:g} s"
          " timeout", file=sys.stderr)
    print(f"{'kind':<10} {'N':>5} {'opened':>6} {'ok':>9} {'success':>8} {'p50':>9} {'p99':>9}"
          f" {'open at end':>11} {'recovery':>9} {'killed':>6}")
    results = []
    try:
        for kind in kinds:
            for size in sizes:
                row = one_run(Path(args.root), env, address, kind, size, args)
                results.append(row)
                print(f"{kind:<10} {size:>5} {row['opened']:>6} {row['ok']:>4}/{row['sent']:<4}"
                      f" {100 * row['success']:>7.1f}% {_ms(row['p50_ms']):>9}"
                      f" {_ms(row['p99_ms']):>9} {row['open_at_end']:>11}"
                      f" {_s(row['recovery_s']):>9} {row['worker_timeouts']:>6}", flush=True)
    finally:
        upstream.shutdown()
    killed = sum(row["worker_timeouts"] for row in results)
    print(f"workers killed by the master (WORKER TIMEOUT), all runs: {killed}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"root": args.root, "runs": results}, indent=1))
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def one_run(root: Path, env: dict[str, str], address: str, kind: str, size: int,
            args: argparse.Namespace) -> dict:
    """One kind of bad client, ``size`` of them, against a gateway of its own."""
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-slow."))
    gateway = Gateway(root, workdir, env)
    try:
        if gateway.wait_healthy(30) is None:
            raise SystemExit(f"the gateway did not come up:\n{gateway.log()[-3000:]}")
        status = gateway.request("POST", "/register_service", f"bench,{address}".encode())
        if status not in (200, 201):
            raise SystemExit(f"POST /register_service answered {status}")
        deadline = time.monotonic() + 10
        while gateway.request("GET", "/bench/", token=True) != 200:
            if time.monotonic() > deadline:
                raise SystemExit("GET /bench/ through the gateway does not answer 200")
            time.sleep(0.1)
        attackers = Attackers(gateway, kind, size)
        if kind == "linger":
            attackers.wait_answered(30)
        time.sleep(1.0)  # let them settle (a slow client has sent its first bytes)
        ok, sent, latencies = legit_traffic(gateway, args.duration, args.interval, args.timeout)
        still_open = attackers.still_open()
        attackers.close()
        recovery = gateway.wait_healthy(30)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        return {"kind": kind, "n": size, "opened": len(attackers.socks), "ok": ok,
                "sent": sent, "success": ok / sent if sent else 0.0,
                "p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "p99_ms": None if p99 is None else round(p99 * 1000, 1),
                "open_at_end": still_open,
                "recovery_s": None if recovery is None else round(recovery, 1),
                "worker_timeouts": gateway.log().count("WORKER TIMEOUT")}
    finally:
        gateway.stop()


if __name__ == "__main__":
    sys.exit(main())
