"""The fast paths (gateway_app/fastpaths.py) against the stock path: the same wire scenarios
through both must produce the same bytes, each fast path checks what it relies on at start,
and one that finds the libraries changed falls back to the stock path with one warning."""

from __future__ import annotations

import http.client
import io
import logging
import random
import socket

import pytest
from urllib3.util import SKIP_HEADER

from gateway_app import fastpaths
from gateway_app.addresses import AddressPolicy
from gateway_app.errors import GatewayError
from gateway_app.fastpaths import parse_headers
from gateway_app.forwarding import Forwarder, UpstreamAborted, release, stream_body
from gateway_app.settings import FAST_PATH_NAMES
from tests.support import ScriptedUpstream

ALL = frozenset(FAST_PATH_NAMES)
NONE: frozenset[str] = frozenset()


def connection_class(fast: frozenset[str], scheme: str = "http") -> type:
    return fastpaths.transport_classes(fast, AddressPolicy())[scheme].ConnectionCls


def test_every_fast_path_is_available_with_the_pinned_libraries():
    assert fastpaths.available(ALL) == ALL
    assert fastpaths.available(NONE) == NONE


# -- header_block ----------------------------------------------------------------------------

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


def test_the_fast_begin_sets_what_http_clients_begin_sets():
    """Every attribute of the response, for each trial answer (the start-time check)."""
    assert fastpaths._check_header_block() is None


def test_the_header_block_check_sees_a_begin_that_sets_more(monkeypatch):
    stock = http.client.HTTPResponse.begin

    def begin(self):  # a later http.client that sets something more
        stock(self)
        self.trailers = None

    monkeypatch.setattr(http.client.HTTPResponse, "begin", begin)
    assert "otherwise" in fastpaths._check_header_block()


# -- header_lines ----------------------------------------------------------------------------

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


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("fast", [ALL, NONE], ids=["fast", "stock"])
def test_upstream_header_lines_are_http_clients(scheme, fast):
    ours = header_lines(connection_class(fast, scheme)("127.0.0.1", 1), HEADER_CALLS)
    assert ours == header_lines(http.client.HTTPConnection("127.0.0.1", 1), HEADER_CALLS)
    assert b"X-Skip: @@@SKIP_HEADER@@@" in ours


@pytest.mark.parametrize("fast", [ALL, NONE], ids=["fast", "stock"])
def test_only_urllib3s_own_marker_skips_a_header(fast):
    lines = header_lines(connection_class(fast)("127.0.0.1", 1), [
        ("User-Agent", (SKIP_HEADER,)), ("Accept-Encoding", (SKIP_HEADER,)),
        ("X-Client", ("".join(SKIP_HEADER),)),  # equal, but a client's string
    ])
    assert not any(line.startswith((b"User-Agent", b"Accept-Encoding")) for line in lines)
    assert b"X-Client: " + SKIP_HEADER.encode() in lines


@pytest.mark.parametrize("fast", [ALL, NONE], ids=["fast", "stock"])
def test_a_header_spelt_otherwise_goes_up_once_and_the_library_adds_none(fast):
    """What Forwarder.send hands urllib3 when a policy added ``user-agent`` in lower case: the
    policy's line goes up, the marker skips nothing else, urllib3 adds no User-Agent."""
    connection = connection_class(fast)("127.0.0.1", 1)
    connection.sock, peer = socket.socketpair()
    with peer:
        connection.request("GET", "/", headers={
            "Host": "up", "user-agent": "policy/1", "User-Agent": SKIP_HEADER,
            "Accept-Encoding": SKIP_HEADER})
        connection.sock.close()
        assert peer.recv(4096) == b"GET / HTTP/1.1\r\nHost: up\r\nuser-agent: policy/1\r\n\r\n"


@pytest.mark.parametrize("call", BAD_HEADER_CALLS)
@pytest.mark.parametrize("fast", [ALL, NONE], ids=["fast", "stock"])
def test_upstream_header_lines_refuse_what_http_client_refuses(call, fast):
    with pytest.raises(ValueError):
        header_lines(http.client.HTTPConnection("127.0.0.1", 1), [call])
    with pytest.raises(ValueError, match="Invalid header"):
        header_lines(connection_class(fast)("127.0.0.1", 1), [call])


# -- the same wire scenarios, fast and stock: the same bytes -------------------------------


class Instance:
    scheme, host, service, id, base_path = "http", "127.0.0.1", "svc", "i1", ""

    def __init__(self, port: int) -> None:
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"


REQUESTS = [
    ("GET", "/a%2fb/%7e?q=%41&r=", {"Host": "up"}, None),
    ("GET", "/", {"Host": "up", "User-Agent": "curl/8", "Accept-Encoding": "gzip",
                  "X-Latin": "caf\xe9", "X-Odd": "@@@SKIP_HEADER@@@", "X-Empty": ""}, None),
    ("GET", "/", {"Host": "up", "user-agent": "policy/1"}, None),
    ("POST", "/upload", {"Host": "up", "Content-Length": "5"}, b"hello"),
    ("PUT", "/chunks", {"Host": "up"}, (b"ab", b"", b"cd")),  # chunks: sent chunked
]

ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nX-A:  spaced  \r\nX-Empty:\r\nX-Latin: caf\xe9\r\n"
    b"Content-Length: 2\r\n\r\nok",
    b"HTTP/1.1 201 Created\r\nX-Folded: one\r\n two\r\n\tthree\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nA: 1\nContent-Length: 2\n\nok",  # bare LF line ends
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil the end",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nX(Bad): 1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\rX-Injected: yes\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 999 Odd\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nA: " + b"x" * 70000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"A: 1\r\n" * 101 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",  # the head cut short
    b"NOT HTTP\r\n\r\n",
]


def outcome(fast: frozenset[str], request: tuple, answer: bytes) -> tuple:
    """What the upstream received, and what the forwarder made of its answer."""
    method, target, headers, body = request
    if isinstance(body, tuple):
        body = iter(body)
    with ScriptedUpstream([answer, "close"]) as upstream:
        forwarder = Forwarder(pool_size=1, fast_paths=fast)
        assert forwarder.fast_paths == fast
        try:
            response = forwarder.send(Instance(upstream.port), method, target, dict(headers),
                                      body, 2, 5)
            try:
                data = b"".join(stream_body(response))
                result: tuple = ("answer", response.status_code, response.reason,
                                 list(response.headers.items()), data)
            except UpstreamAborted as exc:
                result = ("aborted", response.status_code, str(exc))
            release(response)
        except GatewayError as exc:
            result = ("error", type(exc).__name__, exc.kind, exc.description)
        finally:
            forwarder.close()
    return upstream.requests, result


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r[0]} {r[1]}")
def test_requests_go_up_byte_for_byte_the_same(request_):
    answer = ANSWERS[0]
    assert outcome(ALL, request_, answer) == outcome(NONE, request_, answer)


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: repr(a[:24]))
def test_answers_come_back_the_same(answer):
    request_ = REQUESTS[0]
    fast, stock = outcome(ALL, request_, answer), outcome(NONE, request_, answer)
    assert fast == stock
    assert fast[0]  # the request did go up


# -- checked at start ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAST_PATH_NAMES))
def test_a_fast_path_the_libraries_no_longer_allow_falls_back_with_one_warning(
        monkeypatch, caplog, name):
    monkeypatch.setitem(fastpaths._CHECKS, name, lambda: "the trial failed")
    fastpaths._unavailable.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.fastpaths"):
            first = Forwarder(pool_size=1)
            second = Forwarder(pool_size=1)
        assert first.fast_paths == second.fast_paths == ALL - {name}
        warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert warnings == [f"fast path {name} is off, the stock path is used instead: "
                            "the trial failed"]
        first.close()
        second.close()
    finally:
        fastpaths._unavailable.cache_clear()


def test_the_header_lines_check_sees_http_client_without_output(monkeypatch):
    monkeypatch.delattr(http.client.HTTPConnection, "_output")
    assert "_output" in fastpaths._check_header_lines()


def test_the_switch_turns_them_all_off(make_app):
    app = make_app(GATEWAY_FAST_PATHS="off")
    assert app.extensions["gateway"].forwarder.fast_paths == NONE
    app = make_app(GATEWAY_FAST_PATHS="header_lines")
    assert app.extensions["gateway"].forwarder.fast_paths == {"header_lines"}
    assert make_app().extensions["gateway"].forwarder.fast_paths == ALL
