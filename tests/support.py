"""Real processes and sockets for integration tests: gunicorn gateways and loopback upstreams."""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a readiness wait tolerates (a booting gateway on a loaded machine); waits that test
#: a contract's deadline pass that deadline instead.
READY_TIMEOUT = 60.0


#: Ports that :func:`free_port` hands out: below the kernel's ephemeral range (32768 and up on
#: Linux), so no outgoing connection and no ``bind(("127.0.0.1", 0))`` takes one of them.
PORT_RANGE = range(20000, 32000)
#: One byte per port, locked (fcntl, released when the process ends) by the test process that
#: took the port: test processes running at once (pytest-xdist workers, other checkouts' runs)
#: never hand out the same one.
_PORT_LOCKS = Path(tempfile.gettempdir()) / f"gateway-tests-ports-{os.getuid()}.lock"
_port_state: dict = {}


def _port_lock_file() -> int:
    if _port_state.get("pid") != os.getpid():  # a forked child takes ports of its own
        fd = os.open(_PORT_LOCKS, os.O_RDWR | os.O_CREAT, 0o666)
        _port_state.update(pid=os.getpid(), fd=fd,
                           next=random.randrange(len(PORT_RANGE)))  # spread the processes
    return _port_state["fd"]


def free_port() -> int:
    """A loopback port that nothing listens on, for a server that must bind it itself (a
    gateway's workers each bind with SO_REUSEPORT, so they cannot share a port-0 socket).

    Never the same port twice in one test run, nor one another test process holds; and checked
    free with a bind, as gunicorn would bind it."""
    fd = _port_lock_file()
    for _ in range(len(PORT_RANGE)):
        port = PORT_RANGE[_port_state["next"] % len(PORT_RANGE)]
        _port_state["next"] += 1
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
        except OSError:  # another test process has it
            continue
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:  # something else listens there: keep the lock, try the next
                continue
        return port
    raise AssertionError(f"no free port left in {PORT_RANGE}")


#: How often a test's own HTTP server looks for a shutdown request (socketserver's default,
#: 0.5 s, made every server's teardown wait half a second: about 40 s of the suite's time).
SHUTDOWN_POLL = 0.01


class QuickShutdown:
    """Mixin for a ``socketserver`` server: ``shutdown()`` returns within ``SHUTDOWN_POLL``,
    and a listen backlog that a burst of connections does not overflow.

    socketserver listens with a backlog of 5: a gateway's workers opening more connections
    than that at once, while the test process is slow to accept (a loaded machine), had
    their SYN dropped and sent again a second later (seen: 1.1 s of upstream time on a
    request, failing the registry's one-second test under stress-ng)."""

    request_queue_size = 1024

    def serve_forever(self, poll_interval: float = SHUTDOWN_POLL) -> None:
        super().serve_forever(poll_interval)  # type: ignore[misc]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _own_signal_handlers(pid: int) -> bool:
    """Has gunicorn worker ``pid`` installed its own signal handlers? Until it does, it runs
    the master's, inherited at fork, which only queue a signal for a master loop the worker
    never runs: a SIGTERM or SIGQUIT sent then is lost, the worker boots and stays (seen under
    stress-ng: a restart waited 60 s for its new workers; a stop was cut short by SIGKILL
    after 20 s, so the master's exit hook never removed the metric files). Only a worker
    catches SIGABRT."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGABRT - 1) & 1)
    except OSError:  # gone meanwhile: look again
        pass
    return False


class Gateway:
    """A real gateway: ``gunicorn -c gunicorn.conf.py wsgi:app`` in its own process group."""

    def __init__(self, data_dir: Path, port: int | None = None, **env: object) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "GATEWAY_BIND": f"127.0.0.1:{self.port}",
            "GATEWAY_DATA_DIR": str(data_dir),
            "GATEWAY_WORKERS": "2",
            "GATEWAY_THREADS": "8",
        }
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / f"gunicorn-{self.port}.log"

    def start(self, wait: bool = True) -> Gateway:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return requests.get(self.url + "/_gateway/health", timeout=5).status_code == 200
            except requests.RequestException:  # not listening yet, or a booting worker is slow
                return False

        def all_workers():
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            pids = self.worker_pids()
            return len(pids) >= int(self.env["GATEWAY_WORKERS"]) and all(
                _own_signal_handlers(pid) for pid in pids)

        wait_for(ready, timeout, 0.05, "the gateway to answer /_gateway/health")
        # Every worker must have booted, not just the first one to answer; and each must have
        # its own signal handlers, so that a test's SIGTERM or SIGQUIT is not lost on it.
        try:
            wait_for(all_workers, timeout, 0.05, "all workers")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; workers {self.worker_pids()}; log:\n{self.log()}") \
                from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    def stop(self, graceful: bool = False) -> None:
        """SIGTERM (graceful: in-flight requests finish) or SIGQUIT (quick) the gateway."""
        if self.proc and self.proc.poll() is None:
            # The master alone: it passes the signal on to its workers (a worker signalled
            # twice can deadlock in gthread's shutdown).
            os.kill(self.proc.pid, signal.SIGTERM if graceful else signal.SIGQUIT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc:
            try:  # nothing of it may outlive the test
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._close_log()

    def discard(self) -> None:
        """``kill -9`` whatever is left of the gateway: the end of a test that no longer looks
        at it (a test of shutdown itself calls :meth:`stop` first)."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.stop()

    def kill9(self) -> None:
        """``kill -9`` the master and every worker at once: no cleanup code runs."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log and not log.closed:
            log.close()

    def register(self, name: str, address: str, **fields) -> requests.Response:
        if fields:
            return requests.post(self.url + "/register_service",
                                 json={"name": name, "address": address, **fields}, timeout=5)
        return requests.post(self.url + "/register_service", data=f"{name},{address}", timeout=5)

    def services(self) -> dict:
        return requests.get(self.url + "/_gateway/services", timeout=5).json()

    def fresh_get(self, path: str, headers: dict | None = None,
                  timeout: float = 10) -> requests.Response:
        """A GET on a new connection, so successive calls can land on different workers."""
        return requests.get(self.url + path, headers={"Connection": "close", **(headers or {})},
                            timeout=timeout)


    def wait_idle(self, name: str, timeout: float = READY_TIMEOUT) -> dict:
        """Wait until no request is in flight to any instance of service ``name``, and return
        its listing. Each worker reports its count a moment after it changes, so a listing
        right after traffic may still show another worker's requests that have just ended."""
        found: dict = {}

        def idle() -> bool:
            found.update(requests.get(f"{self.url}/_gateway/services/{name}", timeout=10).json())
            return all(instance["in_flight"] == 0 for instance in found["instances"])

        wait_for(idle, timeout, what=f"no request in flight to {name}")
        return found

    def wait_routable(self, path: str, headers: dict, status: int | tuple[int, ...] = 200,
                      timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``path`` answers ``status`` on every worker. A readiness wait, generous
        for a loaded machine; a test of the spec's one second passes ``timeout=1.0``.

        Each check is a round of requests sent at once (4 per worker, each on a new connection,
        so the kernel spreads them over the workers): a round takes about one request's time,
        not the sum of them, and a contract's one second is not eaten by probing on a busy
        machine."""
        tries = 4 * int(self.env["GATEWAY_WORKERS"])
        wanted = status if isinstance(status, tuple) else (status,)
        with ThreadPoolExecutor(tries) as pool:
            def round_answers() -> bool:
                statuses = pool.map(lambda _: self.fresh_get(path, headers).status_code,
                                    range(tries))
                return all(each in wanted for each in list(statuses))

            wait_for(round_answers, timeout, what=f"{path} to answer {status} on every worker")


class Recorder(BaseHTTPRequestHandler):
    """An upstream that answers by path and remembers what it received."""

    protocol_version = "HTTP/1.1"
    #: TCP_NODELAY, as real servers set it: without it the head and the body, written apart,
    #: wait on the peer's delayed ACK (about 40 ms a response on loopback).
    disable_nagle_algorithm = True
    server: UpstreamServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while True:
                line = self.rfile.readline().split(b";")[0].strip()
                if not line:  # the sender gave up mid-body
                    return data
                size = int(line, 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_one(self) -> None:
        body = self._body()
        # The target as it came on the wire (http.server collapses a leading "//" in .path).
        self.path = self.requestline.split(" ")[1]
        self.server.seen.append({"method": self.command, "path": self.path,
                                 "headers": dict(self.headers.items()), "body": body})
        parts = self.path.split("?")[0].strip("/").split("/")
        route = parts[0]
        if route == "big":  # /big/N streams N bytes
            size = int(parts[1])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * 65536
            while size > 0:
                self.wfile.write(block[:size])
                size -= 65536
        elif route == "slow":  # /slow/SECONDS: a slow upstream, the behaviour under test
            time.sleep(float(parts[1]))
            self._send(200, b"slow")
        elif route == "status":
            self._send(int(parts[1]), b"status body")
        elif route == "cookie":
            self._send(200, b"cookie", [("Set-Cookie", "session=s3cret; Path=/"),
                                        ("Set-Cookie", "theme=dark; Path=/")])
        elif route == "json":  # a small JSON object of a fixed length (21 bytes)
            self._send(200, b'{"greeting": "hello"}', [("Content-Type", "application/json")])
        elif route == "redirect":
            self._send(302, b"see elsewhere", [("Location", "/elsewhere")])
        elif route in ("truncate", "truncate-small"):  # promises more than 10, sends 10
            self.send_response(200)
            self.send_header("Content-Length", "100000" if route == "truncate" else "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
        else:
            echo = {"method": self.command, "path": self.path, "headers": dict(self.headers),
                    "body_length": len(body), "port": self.server.server_address[1]}
            self._send(200, json.dumps(echo).encode(), [("Content-Type", "application/json")])

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = handle_one


class UpstreamServer(QuickShutdown, ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Recorder)
        self.seen: list[dict] = []
        self.port = self.server_address[1]
        self.address = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> UpstreamServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class RawServer:
    """A TCP server that misbehaves: ``reset`` the connection, or answer ``garbage``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.address = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                if self.mode == "garbage":
                    conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")
                else:  # RST instead of FIN
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


class ScriptedUpstream:
    """A loopback upstream that answers every connection from a script of exact bytes.

    For each connection it reads one request head (and a ``Content-Length`` body), then plays
    ``script``: ``bytes`` are sent as they are, a number is a pause of that many seconds,
    ``"reset"`` ends the connection with an RST, ``"close"`` with a FIN. When the script ends
    without either, the connection is held until the peer closes it. ``requests`` keeps what
    came in; ``open_connections`` counts the connections the peer (the gateway) has not closed.
    """

    def __init__(self, script: list[bytes | float | str]) -> None:
        self.script = script
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"http://127.0.0.1:{self.port}"
        self.requests: list[bytes] = []
        self._open: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length, chunked = 0, False
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        while (len(body) < length or chunked and not (
                body.startswith(b"0\r\n\r\n") or b"\r\n0\r\n\r\n" in body)):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def _serve(self, conn: socket.socket) -> None:
        key = conn.fileno()
        with self._lock:
            self._open[key] = conn
        try:
            conn.settimeout(60)
            self.requests.append(self._read_request(conn))
            for step in self.script:
                if isinstance(step, bytes):
                    conn.sendall(step)
                elif step == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                elif step == "close":
                    return
                elif self._stop.wait(float(step)):
                    return
            while conn.recv(65536):  # held: wait for the gateway to close its end
                pass
        except OSError:  # the gateway closed or reset its end first
            pass
        finally:
            with self._lock:
                self._open.pop(key, None)
            conn.close()

    def __enter__(self) -> ScriptedUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.sock.close()
        # Connections still held (the script ended and the peer keeps its end open, say in
        # an idle pool) are ended here: the test has made its assertions, and each thread
        # would otherwise wait out its join below.
        with self._lock:
            held = list(self._open.values())
        for conn in held:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK",
               "0A": "LISTEN", "0B": "CLOSING"}


#: Where each table of /proc/PID/net keeps a socket's inode.
_INODE_COLUMNS = {"tcp": 9, "tcp6": 9, "udp": 9, "udp6": 9, "raw": 9, "raw6": 9, "unix": 6,
                  "netlink": 9, "packet": 8}


def leaked_sockets(pids: list[int], port: int) -> list[str]:
    """Sockets the processes ``pids`` still hold towards ``port`` (in any state), and sockets
    they hold that the kernel has already closed (what is left of a connection reset under a
    leaked socket object): what a gateway must not keep after an upstream exchange is over."""
    found = []
    for pid in pids:
        inodes = _socket_inodes(pid)
        listed = set()
        for table, column in _INODE_COLUMNS.items():
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) <= column:
                    continue
                inode = fields[column]
                listed.add(inode)
                if table.startswith("tcp") and inode in inodes \
                        and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    found.append(f"pid {pid}: {_TCP_STATES.get(fields[3], fields[3])} "
                                 f"to port {port}")
        found.extend(f"pid {pid}: closed socket still held (inode {inode})"
                     for inode in inodes - listed)
    return found


class RawResponse:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def getheader(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self):
        return json.loads(self.body)


def raw_request(port: int, request_line: str, headers: dict[str, str] | None = None,
                body: bytes = b"") -> RawResponse:
    """Send a request line exactly as given (no client-side normalisation); read it whole."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        method, target = request_line.split(" ", 1)
        conn.putrequest(method, target, skip_host="Host" in (headers or {}),
                        skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        return RawResponse(response.status, response.headers, response.read())
    finally:
        conn.close()


class RelayHandler(BaseHTTPRequestHandler):
    """Passes each request on to ``server.target`` (a base URL) as a plain proxy would: same
    method, path (without its first segment), headers and body; answers with what came back."""

    protocol_version = "HTTP/1.1"
    #: TCP_NODELAY, as real servers set it: without it the head and the body, written apart,
    #: wait on the peer's delayed ACK (about 40 ms a response on loopback).
    disable_nagle_algorithm = True
    server: Relay

    def log_message(self, *args):
        pass

    def handle_one(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        self.server.seen.append(self.requestline)
        target = self.requestline.split(" ")[1]
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in self.server.drop | {"host", "connection"}}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=10)
        try:
            conn.request(self.command, target, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            status, answer_headers = answer.status, answer.getheaders()
        except OSError as exc:
            status, answer_headers, data = 599, [], str(exc).encode()
        finally:
            conn.close()
        self.send_response(status)
        for key, value in answer_headers:
            if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = handle_one


class Relay(QuickShutdown, ThreadingHTTPServer):
    """A local relay to ``target_port`` (a gateway, say), dropping the headers named in
    ``drop`` (lower-case)."""

    daemon_threads = True

    def __init__(self, target_port: int, drop: frozenset[str] = frozenset()) -> None:
        super().__init__(("127.0.0.1", 0), RelayHandler)
        self.target_port = target_port
        self.drop = drop
        self.seen: list[str] = []
        self.port = self.server_address[1]
        self.address = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> Relay:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def send_raw(port: int, data: bytes, half_close: bool = True, timeout: float = 15.0,
             source: str = "127.0.0.1") -> bytes:
    """Send ``data`` on a new connection (then half-close it), and return all that comes back
    until the gateway closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """The first HTTP response in ``data``: status, headers (lower-cased names), body."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    return status, headers, body[:int(length)] if length and length.isdigit() else body
