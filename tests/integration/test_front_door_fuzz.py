"""Generated input against a real gateway: thousands of malformed request lines, headers and
chunked bodies. Whatever comes in, the gateway never answers 500 or an HTML page, and never
forwards a request it refused."""

from __future__ import annotations

import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_token
from tests.support import parse_response

#: Bytes that make parsers stumble, mixed into otherwise plausible requests.
_NASTY = ["%", "%2e", "%2E", "%2f", "%5c", "%00", "%252e", ".", "..", ";", "\\", "#", "?", " ",
          "\t", "\r", "\n", "\x00", "\x7f", "\xff", "é", "//", "/", "%zz", "*", "@", ":"]
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
            "get", "G ET", "", "BREW", "GET\x00"]
_VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "HTTP/1", "http/1.1", "",
             "HTTP/1.1 extra", "HTTP/01.1"]
_HEADER_NAMES = ["Host", "Content-Length", "Transfer-Encoding", "SCRIPT_NAME", "PATH_INFO",
                 "Via", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded",
                 "X-Request-ID", "Connection", "Expect", "TE", "Authorization", "Content-Type",
                 "X(Bad)", "Bad Name", "", ":", "X-\x01", "Upgrade", "Trailer"]
_CHUNK_SIZES = ["3", "-3", "0x3", "+3", " 3", "3 ", "03", "ffffffffffffffffff", "", "z", "3;x=1",
                "3;\x01", "3\x00", "0"]


def _text(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(st.sampled_from(_NASTY),
                              st.text("abcXYZ019-_~", min_size=1, max_size=4)),
                    min_size=min_size, max_size=max_size).map("".join)


_targets = st.one_of(
    st.builds(lambda rest: "/echo/" + rest, _text()),
    st.builds(lambda rest: "/" + rest, _text()),
    st.builds(lambda rest: "/_gateway/" + rest, _text(max_size=4)),
    st.sampled_from(["*", "http://evil.example/echo/x", "echo/x", "//echo/x", "/%65cho/x",
                     "/echo/..;/x", "/echo/%2e%2e%2fx", "/echo/..\\x"]),
)
_headers = st.lists(st.tuples(st.sampled_from(_HEADER_NAMES), _text(max_size=6)), max_size=6)


def _chunked_body(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        size = draw(st.sampled_from(_CHUNK_SIZES))
        payload = draw(st.binary(max_size=6))
        ending = draw(st.sampled_from([b"\r\n", b"\n", b"", b"XX"]))
        parts.append(size.encode("latin-1") + b"\r\n" + payload + ending)
    parts.append(draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nContent-Length: 5\r\n\r\n",
                                       b"0\r\nX-Trailer: y\r\n\r\n", b"", b"0\r\n"])))
    return b"".join(parts)


@st.composite
def requests_on_the_wire(draw: st.DrawFn, token: str) -> bytes:
    # Mostly plausible, with one or two parts off, so the parsers past the first are reached.
    plausible = draw(st.integers(0, 3)) > 0
    method = draw(st.sampled_from(["GET", "POST", "PUT"] if plausible else _METHODS))
    target = draw(st.builds(lambda rest: "/echo/" + rest, _text()) if plausible else _targets)
    version = "HTTP/1.1" if plausible else draw(st.sampled_from(_VERSIONS))
    lines = [f"{method} {target} {version}".rstrip()]
    if plausible or draw(st.booleans()):
        lines.append("Host: gw")
    if plausible or draw(st.booleans()):
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in draw(_headers)
              if not plausible or draw(st.integers(0, 4)) == 0]
    body = b""
    framing = draw(st.sampled_from(["none", "chunked", "length", "short", "long"]))
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        body = _chunked_body(draw)
    elif framing != "none":
        body = draw(st.binary(max_size=40))
        declared = {"length": len(body), "short": max(0, len(body) - 3),
                    "long": len(body) + 7}[framing]
        lines.append(f"Content-Length: {declared}")
    lines.append("Connection: close")
    return "\r\n".join(lines).encode("latin-1", "replace") + b"\r\n\r\n" + body


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the gateway already answered and closed
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_generated_requests_never_get_a_500_an_html_page_or_forwarded_when_refused(
        gateway, upstream):
    gateway.register("echo", upstream.address + "/base")
    token = make_token(ttl=3600)
    gateway.wait_routable("/echo/x", {"Authorization": f"Bearer {token}"})

    @settings(max_examples=2500, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=requests_on_the_wire(token))
    def exchange(data: bytes) -> None:
        seen = len(upstream.seen)
        answer = _exchange(gateway.port, data)
        if not answer:
            return  # closed without an answer: allowed for what cannot be parsed at all
        status, headers, body = parse_response(answer)
        assert status != 0, answer[:200]
        assert status != 500 and b"<html" not in answer.lower(), (data, answer[:300])
        if status >= 400 and headers.get("content-type") == "application/json" \
                and not data.startswith(b"HEAD "):  # (a HEAD answer has no body to read)
            doc = json.loads(body) if body else {}
            if "error" in doc:  # the gateway's own refusal: nothing went up
                assert set(doc) == {"error", "message", "request_id"}
                assert len(upstream.seen) == seen, (data, doc)

    exchange()
    assert len(upstream.seen) > 100  # (many generated requests were good enough to go up)
    # Nothing is left behind: no request in flight, no failure blamed on the instance.
    instance = gateway.wait_idle("echo")["instances"][0]
    assert instance["consecutive_failures"] == 0
