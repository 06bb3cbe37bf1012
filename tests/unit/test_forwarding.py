"""Talking to upstreams: the header lines sent, the header parser, and real sockets through the
Forwarder."""

from __future__ import annotations

import http.client
import io
import random
import socket
import threading
import time

import pytest
from urllib3.util import SKIP_HEADER

from gateway_app.errors import BadGateway, GatewayTimeout
from gateway_app.forwarding import (
    Forwarder,
    UpstreamAborted,
    _HTTPConnection,
    _HTTPSConnection,
    parse_headers,
    release,
    stream_body,
)

BLOCKS = [
    b"Server: nginx\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n",
    b"X-A:  spaced value  \r\nX-Empty:\r\nX-Tab:\tv\r\nX-Colons: a:b:c\r\n\r\n",
    b"A: 1\nB: 2\n\n",  # bare LF
    b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",  # repeated names keep their order
    b"A: caf\xc3\xa9\r\n\r\n",  # bytes above ASCII, taken as latin-1
    b"\r\n",
    b"A: 1\r\n folded\r\n\r\n",  # obsolete line folding
    b"A: 1\r\nBad Name: x\r\nC: 3\r\n\r\n",  # not a header name: the rest is a body (a defect)
    b"A: 1\r\nB: x\ry\r\n\r\n",  # a stray CR splits the line, for the email parser
    b"A: 1 \r\r\nB: 2\r\n\r\n",  # ... and one before CRLF ends the block
    b"A: 1\r\n",  # no blank line before the end
    b"",
    b":x\r\n\r\n",
    b"NoColon\r\n\r\n",
    b"From nobody\r\nA: 1\r\n\r\n",
]


def summary(message: http.client.HTTPMessage) -> tuple:
    return (message.items(), [type(d) for d in message.defects], message.get_payload(),
            message.get_unixfrom())


@pytest.mark.parametrize("block", BLOCKS)
def test_header_blocks_parse_as_http_client_parses_them(block):
    assert summary(parse_headers(io.BytesIO(block))) == \
        summary(http.client.parse_headers(io.BytesIO(block)))


def test_random_header_blocks_parse_as_http_client_parses_them():
    pieces = [b"A", b"x-y", b":", b": ", b" ", b"\t", b"\r", b"\n", b"\r\n", b"v", b"\xe9",
              b"From ", b"\x00", b"@", b"1"]
    rng = random.Random(20261128)
    for _ in range(3000):
        block = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 24))) + b"\r\n\r\n"
        assert summary(parse_headers(io.BytesIO(block))) == \
            summary(http.client.parse_headers(io.BytesIO(block))), block


def test_header_block_bounds_are_http_clients():
    with pytest.raises(http.client.LineTooLong):
        parse_headers(io.BytesIO(b"A: " + b"x" * 70000 + b"\r\n\r\n"))
    with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
        parse_headers(io.BytesIO(b"A: 1\r\n" * 101 + b"\r\n"))


HEADER_CALLS = [
    ("X-Forwarded-For", ("127.0.0.1",)),
    ("Authorization", ("Bearer a.b.c",)),
    ("X-Empty", ("",)),
    ("X-Latin", ("café",)),
    ("X-Folded", ("a\r\n b",)),  # a folded value passes http.client's check too
    ("X-Skip", ("@@@SKIP_HEADER@@@",)),  # urllib3's marker, from a client: sent as it is
    ("X-Number", (42,)),  # not one str: the usual way
    ("X-Two", ("a", "b")),
]
BAD_HEADER_CALLS = [
    ("X-Injected", ("a\r\nX-Evil: 1",)),
    ("X-Bare-LF", ("a\nb",)),
    ("X-CR", ("a\rb",)),
    (" Leading-Space", ("v",)),
    ("Bad:Name", ("v",)),
    ("", ("v",)),
]


def header_lines(connection, calls):
    connection.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
    for name, values in calls:
        connection.putheader(name, *values)
    return connection._buffer


@pytest.mark.parametrize("connection_class", [_HTTPConnection, _HTTPSConnection])
def test_upstream_header_lines_are_http_clients(connection_class):
    ours = header_lines(connection_class("127.0.0.1", 1), HEADER_CALLS)
    assert ours == header_lines(http.client.HTTPConnection("127.0.0.1", 1), HEADER_CALLS)
    assert b"X-Skip: @@@SKIP_HEADER@@@" in ours


def test_only_urllib3s_own_marker_skips_a_header():
    lines = header_lines(_HTTPConnection("127.0.0.1", 1), [
        ("User-Agent", (SKIP_HEADER,)), ("Accept-Encoding", (SKIP_HEADER,)),
        ("X-Client", ("".join(SKIP_HEADER),)),  # equal, but a client's string
    ])
    assert not any(line.startswith((b"User-Agent", b"Accept-Encoding")) for line in lines)
    assert b"X-Client: " + SKIP_HEADER.encode() in lines


def test_a_header_spelt_otherwise_goes_up_once_and_the_library_adds_none():
    """What Forwarder.send hands urllib3 when a policy added ``user-agent`` in lower case: the
    policy's line goes up, the marker skips nothing else, urllib3 adds no User-Agent."""
    connection = _HTTPConnection("127.0.0.1", 1)
    connection.sock, peer = socket.socketpair()
    with peer:
        connection.request("GET", "/", headers={
            "Host": "up", "user-agent": "policy/1", "User-Agent": SKIP_HEADER,
            "Accept-Encoding": SKIP_HEADER})
        connection.sock.close()
        assert peer.recv(4096) == b"GET / HTTP/1.1\r\nHost: up\r\nuser-agent: policy/1\r\n\r\n"


@pytest.mark.parametrize("call", BAD_HEADER_CALLS)
def test_upstream_header_lines_refuse_what_http_client_refuses(call):
    with pytest.raises(ValueError):
        header_lines(http.client.HTTPConnection("127.0.0.1", 1), [call])
    with pytest.raises(ValueError, match="Invalid header"):
        header_lines(_HTTPConnection("127.0.0.1", 1), [call])


class Instance:
    scheme, host, service, id, base_path = "http", "127.0.0.1", "svc", "i1", ""

    def __init__(self, port: int) -> None:
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"


def test_forwarder_reads_real_responses_with_plain_and_folded_headers():
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Plain: yes\r\nContent-Length: 5\r\n"
        b"\r\nhello",
        b"HTTP/1.1 201 Created\r\nX-Folded: one\r\n two\r\nContent-Length: 2\r\n\r\nok",
    ]
    server = socket.create_server(("127.0.0.1", 0))
    requests_seen: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()  # one keep-alive connection for both answers
        with conn:
            for answer in answers:
                requests_seen.append(conn.recv(65536))
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    forwarder = Forwarder(pool_size=2)
    instance = Instance(server.getsockname()[1])
    try:
        first = forwarder.send(instance, "GET", "/a%2fb?q=1", {"Host": "x"}, None, 2, 5)
        assert first.status_code == 200
        assert first.headers["X-Plain"] == "yes"
        assert b"".join(stream_body(first, "svc")) == b"hello"
        release(first)

        second = forwarder.send(instance, "GET", "/", {"Host": "x"}, None, 2, 5)
        assert second.status_code == 201
        assert second.headers["X-Folded"] == "one two"  # unfolded, as urllib3 always did
        assert b"".join(stream_body(second, "svc")) == b"ok"
        release(second)
    finally:
        forwarder.close()
        server.close()
    thread.join(5)
    assert requests_seen[0].startswith(b"GET /a%2fb?q=1 HTTP/1.1\r\n")


class ScriptedUpstream:
    """A loopback server taking one connection and following a script: per request, after
    reading it, sleep, then send the answer (or send nothing and wait)."""

    def __init__(self, script: list[tuple[float, bytes | None]]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.script = script
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            for delay, answer in self.script:
                conn.recv(65536)
                if answer is None:
                    self.done.wait(10)
                    return
                self.done.wait(delay)
                conn.sendall(answer)
            self.done.wait(10)

    def close(self) -> None:
        self.done.set()
        self.server.close()
        self.thread.join(5)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def timed_send(forwarder, instance, read_timeout: float, connect_timeout: float = 2,
               body: bytes | None = None):
    started = time.monotonic()
    try:
        response = forwarder.send(instance, "POST" if body else "GET", "/", {"Host": "x"}, body,
                                  connect_timeout, read_timeout)
    except Exception as exc:  # noqa: BLE001 (the test looks at what was raised)
        return exc, time.monotonic() - started
    b"".join(stream_body(response, "svc"))
    release(response)
    return response, time.monotonic() - started


def test_read_timeout_holds_on_a_reused_connection_and_follows_each_request():
    upstream = ScriptedUpstream([(0, OK), (0, OK), (5, OK)])
    forwarder = Forwarder(pool_size=1)
    instance = Instance(upstream.port)
    try:
        first, _ = timed_send(forwarder, instance, read_timeout=5)
        assert first.status_code == 200
        second, _ = timed_send(forwarder, instance, read_timeout=5)  # the same connection
        assert second.status_code == 200
        error, took = timed_send(forwarder, instance, read_timeout=0.3)  # ...now 0.3 s
        assert isinstance(error, GatewayTimeout)
        assert 0.25 < took < 2
    finally:
        forwarder.close()
        upstream.close()


def test_read_timeout_mid_body_aborts_the_stream():
    upstream = ScriptedUpstream([(0, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")])
    forwarder = Forwarder(pool_size=1)
    try:
        response = forwarder.send(Instance(upstream.port), "GET", "/", {"Host": "x"}, None, 2,
                                  0.3)
        started = time.monotonic()
        with pytest.raises(UpstreamAborted):
            b"".join(stream_body(response, "svc"))
        assert time.monotonic() - started < 2
        release(response)
    finally:
        forwarder.close()
        upstream.close()


def test_send_timeout_holds_when_the_upstream_stops_reading():
    upstream = ScriptedUpstream([(0, None)])  # reads one chunk, then nothing more
    forwarder = Forwarder(pool_size=1)
    result: list = []
    sender = threading.Thread(target=lambda: result.append(timed_send(
        forwarder, Instance(upstream.port), read_timeout=5, connect_timeout=0.3,
        body=b"x" * (64 * 1024 * 1024))))
    try:
        sender.start()
        sender.join(10)
        assert not sender.is_alive(), "sending never timed out"
        error, took = result[0]
        assert isinstance(error, (GatewayTimeout, BadGateway))
        assert took < 5
    finally:
        upstream.close()
        sender.join(10)
        forwarder.close()
