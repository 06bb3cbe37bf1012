"""Slow and idle clients hold no request thread (README: How it is built): the worker's event
loop reads request heads, small bodies and lingering closes, with deadlines, and caps its
connections.

The gateways here have 2 workers of 8 threads (1 worker where placement matters): a hundred
bad connections are several times what would have held every thread of gthread's worker.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support import ROOT, free_port, wait_for

LEGIT_TIMEOUT = 10.0  # generous: the suite also runs on a loaded machine


def connect(port: int, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if first:
        sock.sendall(first)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (reading and dropping any answer before that)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


@contextlib.contextmanager
def dribbling(socks: list[socket.socket], every: float = 0.5) -> Iterator[None]:
    """Send each of ``socks`` a byte every ``every`` seconds (a slowloris client)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"a")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def legit_gets(gateway, path: str, headers: dict[str, str], count: int) -> list[int]:
    """``count`` GETs on new connections, one after the other; their statuses."""
    return [gateway.fresh_get(path, headers, timeout=LEGIT_TIMEOUT).status_code
            for _ in range(count)]


@pytest.fixture
def echo(start_gateway, upstream, auth):
    """A gateway (header and body timeouts of 2 s) with the upstream registered as ``echo``."""
    gateway = start_gateway(GATEWAY_CLIENT_HEADER_TIMEOUT="2", GATEWAY_CLIENT_BODY_TIMEOUT="2")
    assert gateway.register("echo", upstream.address).status_code == 201
    gateway.wait_routable("/echo/", auth)
    return gateway


def test_slow_heads_and_idle_connections_leave_legitimate_requests_served(start_gateway,
                                                                         upstream, auth):
    gateway = start_gateway()  # the default header timeout: the bad clients stay the while
    assert gateway.register("echo", upstream.address).status_code == 201
    gateway.wait_routable("/echo/", auth)
    idle = [connect(gateway.port) for _ in range(100)]
    slow = [connect(gateway.port, b"GET /echo/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            for _ in range(100)]
    try:
        with dribbling(slow):
            statuses = legit_gets(gateway, "/echo/", auth, 20)
            assert statuses == [200] * 20
            # Held open, not turned away: the gateway just gives them no thread.
            assert not any(closed_by_server(sock) for sock in idle + slow)
    finally:
        for sock in idle + slow:
            sock.close()


def test_a_head_not_sent_in_time_closes_its_connection(echo, auth):
    slow = connect(echo.port, b"GET /echo/ HTTP/1.1\r\nHost: x\r\n")
    idle = connect(echo.port)
    try:
        wait_for(lambda: closed_by_server(slow) and closed_by_server(idle), 15, 0.1,
                 "the header timeout to close both connections")
        assert legit_gets(echo, "/echo/", auth, 2) == [200, 200]
    finally:
        slow.close()
        idle.close()


def read_answer(sock: socket.socket, timeout: float = 20.0) -> int | None:
    """The status the server answered on ``sock``, or ``None`` when it closed without one."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        return None
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize("declared, sent", [
    (1000, 10),              # read by the loop: never reaches the upstream at all
    (200_000, 100_000),      # past what the loop reads: a thread streams it up, then stalls
])
def test_a_slow_body_gets_408_or_a_close_and_never_reaches_the_upstream_whole(
        echo, upstream, auth, declared, sent):
    head = (f"POST /echo/upload HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}"
            f"\r\nContent-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n")
    sock = connect(echo.port, head.encode() + b"x" * sent)  # ... and nothing more
    try:
        started = time.monotonic()
        status = read_answer(sock)
        # 408: the gateway's answer to a client that stopped sending, from the loop (a small
        # body) or from the request's thread (a large one); never anything from the upstream.
        assert status == 408
        assert time.monotonic() - started < 15  # the body timeout is 2 s
    finally:
        sock.close()
    uploads = [seen for seen in upstream.seen if seen["path"] == "/upload"]
    assert all(len(seen["body"]) < declared for seen in uploads)
    if declared == 1000:
        assert uploads == []
    assert legit_gets(echo, "/echo/", auth, 2) == [200, 200]


def test_a_small_body_is_read_by_the_loop_and_forwarded_whole(echo, upstream, auth):
    """Content-Length and chunked bodies sent in pieces, with pauses under the body timeout."""
    for framing in ("length", "chunked"):
        body = b"0123456789" * 100
        if framing == "length":
            head = f"Content-Length: {len(body)}\r\n"
            parts = [body[:300], body[300:700], body[700:]]
        else:
            head = "Transfer-Encoding: chunked\r\n"
            parts = [b"12c\r\n" + body[:300] + b"\r\n", b"2bc\r\n" + body[300:],
                     b"\r\n0\r\n\r\n"]
        request = (f"POST /echo/{framing} HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: {auth['Authorization']}\r\n{head}\r\n")
        sock = connect(echo.port, request.encode())
        try:
            for part in parts:
                time.sleep(0.3)
                sock.sendall(part)
            assert read_answer(sock) == 200
        finally:
            sock.close()
        assert [len(s["body"]) for s in upstream.seen if s["path"] == f"/{framing}"] == [1000]


def test_lingering_close_does_not_stall_other_clients(start_gateway, auth):
    """Clients that send ``Connection: close`` requests and then neither read nor close: each
    cost gthread's loop 2 s; now they linger in the loop, and go within seconds."""
    gateway = start_gateway()
    request = b"GET /_gateway/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    lingering = [connect(gateway.port, request) for _ in range(100)]
    try:
        started = time.monotonic()
        assert legit_gets(gateway, "/_gateway/health", {}, 20) == [200] * 20
        assert time.monotonic() - started < 15
        # Each was answered, then closed by the gateway (2 s of lingering at most).
        wait_for(lambda: all(closed_by_server(sock) for sock in lingering), 20, 0.2,
                 "the gateway to close every lingering connection")
    finally:
        for sock in lingering:
            sock.close()
    assert "WORKER TIMEOUT" not in gateway.log()


def test_past_the_cap_the_oldest_idle_connections_are_closed_first(start_gateway):
    gateway = start_gateway(GATEWAY_WORKERS=1, GATEWAY_MAX_CONNECTIONS=40)
    older = [connect(gateway.port) for _ in range(30)]
    wait_for(lambda: gateway.fresh_get("/_gateway/health").status_code == 200, 10)
    newer = [connect(gateway.port) for _ in range(30)]
    try:
        # 60 idle connections for 40 places: the 20 oldest go, as a new request comes.
        assert legit_gets(gateway, "/_gateway/health", {}, 3) == [200] * 3
        wait_for(lambda: sum(closed_by_server(sock) for sock in older) >= 20, 10, 0.1,
                 "the oldest idle connections to be closed")
        assert not any(closed_by_server(sock) for sock in newer)
    finally:
        for sock in older + newer:
            sock.close()


def test_a_kept_alive_connection_waits_in_the_loop_for_its_next_request(start_gateway):
    # (one worker: with two, one holding both connections would shed one, for balance)
    gateway = start_gateway(GATEWAY_WORKERS=1)
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(gateway.url + "/_gateway/health", timeout=LEGIT_TIMEOUT).ok
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=LEGIT_TIMEOUT)
    try:  # a request pipelined behind another is answered too
        conn.connect()
        conn.sock.sendall(b"GET /_gateway/health HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /_gateway/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.sock.recv(65536):
            data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 2
    finally:
        conn.close()


def test_a_worker_on_an_unsupported_gunicorn_refuses_to_start_and_says_why(tmp_path):
    """gunicorn's version is made to read 23.0.0 in the gateway's process."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_DATA_DIR=str(tmp_path),
               GATEWAY_JWT_SECRET="s" * 32)
    code = ("import sys, gunicorn; gunicorn.__version__ = '23.0.0';"
            " sys.argv = ['gunicorn', '-c', 'gunicorn.conf.py', 'wsgi:app'];"
            " from gunicorn.app.wsgiapp import run; run(prog='gunicorn')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=60,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert ("gunicorn 23.0.0 is installed, but the gateway's worker is written for and tested"
            " with gunicorn>=27.0,<28.0") in result.stderr
    assert "Booting worker" not in result.stderr
