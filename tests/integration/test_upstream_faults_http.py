"""Upstreams that misbehave on purpose, through real gunicorn (README: Proxying, and How it
is built).

Each upstream here is a raw socket server sending exact bytes. Whatever it sends, the client
gets a JSON error before the response starts, or a cut connection after; never gunicorn's HTML
500. After every exchange the instance's ``in_flight`` is back to 0, no socket towards the
upstream is left open in the gateway, and the access log has the request's line.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass

import pytest
import requests

from tests.conftest import SECRET, make_token
from tests.support import (
    READY_TIMEOUT,
    Gateway,
    ScriptedUpstream,
    leaked_sockets,
    parse_response,
    send_raw,
    wait_for,
)

#: Seconds the gateway gives one upstream exchange in all (GATEWAY_UPSTREAM_TIMEOUT).
TOTAL = 3.0


def one_worker_gateway(data_dir, **env) -> Gateway:
    """One worker, so ``in_flight`` and the sockets it holds are those of the worker that
    served the request."""
    return Gateway(data_dir, GATEWAY_WORKERS=1, GATEWAY_JWT_SECRET=SECRET,
                   GATEWAY_UPSTREAM_TIMEOUT=TOTAL, GATEWAY_READ_TIMEOUT=30,
                   GATEWAY_NODE_ID="faults", **env).start()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gateway = one_worker_gateway(tmp_path_factory.mktemp("faults"))
    yield gateway
    gateway.discard()


@pytest.fixture(scope="module")
def stock_gateway(tmp_path_factory):
    """The same gateway with every fast path off (GATEWAY_FAST_PATHS=off)."""
    gateway = one_worker_gateway(tmp_path_factory.mktemp("stock"), GATEWAY_FAST_PATHS="off")
    yield gateway
    gateway.discard()


_names = iter(range(10**6))


@dataclass
class Exchange:
    """One request through the gateway to a scripted upstream, and what came back."""

    name: str
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def exchange(gateway: Gateway, upstream: ScriptedUpstream, timeout: float = 30.0,
             name: str | None = None, extra: str = "", token: str | None = None) -> Exchange:
    """Register ``upstream`` under a new name and send one GET to it on a connection of its
    own (with ``token``, else a new one): what came back, byte for byte."""
    name = name or f"s{next(_names)}"
    token = token or make_token()
    assert gateway.register(name, upstream.address).status_code == 201
    request = (f"GET /{name}/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
               f"{extra}Connection: close\r\n\r\n").encode()
    raw = send_raw(gateway.port, request, half_close=False, timeout=timeout)
    return Exchange(name, *parse_response(raw), raw)


def assert_clean_after(gateway: Gateway, upstream: ScriptedUpstream, answer: Exchange) -> None:
    """Nothing of the exchange is left: in_flight 0, no socket to the upstream, a log line."""

    def in_flight():
        listing = requests.get(f"{gateway.url}/_gateway/services/{answer.name}",
                               timeout=5).json()
        return listing["instances"][0]["in_flight"]

    wait_for(lambda: in_flight() == 0, timeout=READY_TIMEOUT, what="in_flight back to 0")
    wait_for(lambda: not leaked_sockets(gateway.worker_pids(), upstream.port),
             timeout=READY_TIMEOUT, what="no socket left towards the upstream")
    wait_for(lambda: upstream.open_connections == 0, timeout=READY_TIMEOUT,
             what="the upstream's connections closed by the gateway")
    request_id = answer.headers.get("x-request-id")
    assert request_id
    wait_for(lambda: request_id in gateway.log(), timeout=READY_TIMEOUT,
             what="the access log line")


def assert_json_error(answer: Exchange, expected: int = 502) -> None:
    assert answer.status == expected, answer.raw[:500]
    assert answer.headers["content-type"] == "application/json"
    document = json.loads(answer.body)
    assert document["error"] == {502: "bad_gateway", 504: "gateway_timeout"}[expected]
    assert document["request_id"] == answer.headers["x-request-id"]


OK_TAIL = b"Content-Length: 2\r\n\r\nok"

# -- issue 11, item 2: faults that ended in gunicorn's HTML 500 and leaked ------------------
# -- issue 11, item 4: faults that were passed on as they came ------------------------------

MALFORMED_HEADS = {
    "control character in a value": b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\n" + OK_TAIL,
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\n" + OK_TAIL,
    "DEL in a value": b"HTTP/1.1 200 OK\r\nX-Bad: a\x7fb\r\n" + OK_TAIL,
    "a name with parentheses": b"HTTP/1.1 200 OK\r\nX(Bad): 1\r\n" + OK_TAIL,
    "a space before the colon": b"HTTP/1.1 200 OK\r\nX-Bad : 1\r\n" + OK_TAIL,
    "a line without a colon": b"HTTP/1.1 200 OK\r\nNoColon\r\n" + OK_TAIL,
    "Content-Length: abc": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nok",
    "Content-Length: 5, 5": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    "Content-Length: -1": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
    "two different Content-Lengths":
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "Content-Length with Transfer-Encoding":
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    "a transfer coding other than chunked":
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip",
    "a bare CR inside a value (header injection)":
        b"HTTP/1.1 200 OK\r\nX-Bad: a\rX-Injected: yes\r\n" + OK_TAIL,
    "status 999": b"HTTP/1.1 999 Odd\r\n" + OK_TAIL,
    "status 600": b"HTTP/1.1 600 Odd\r\n" + OK_TAIL,
    "101 without an upgrade asked for": b"HTTP/1.1 101 Switching Protocols\r\n"
                                        b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "not HTTP at all": b"THIS IS NOT HTTP\r\n\r\n",
    "a head cut before its blank line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
}


@pytest.mark.parametrize("fault", list(MALFORMED_HEADS))
def test_a_malformed_head_is_a_json_502_and_leaves_nothing(gateway, fault):
    script: list = [MALFORMED_HEADS[fault]]
    if fault == "a head cut before its blank line":
        script.append("close")
    with ScriptedUpstream(script) as upstream:
        answer = exchange(gateway, upstream)
        assert_json_error(answer)
        assert b"X-Injected" not in answer.raw
        assert_clean_after(gateway, upstream, answer)


@pytest.mark.parametrize("cut_at", [0, 5, 17, 30, 45])
def test_a_reset_anywhere_in_the_head_is_a_json_502(gateway, cut_at):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    with ScriptedUpstream([head[:cut_at], 0.2, "reset"]) as upstream:
        answer = exchange(gateway, upstream)
        assert_json_error(answer)
        assert_clean_after(gateway, upstream, answer)


def test_folded_header_lines_are_unfolded_not_refused(gateway):
    answer = b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n two\r\nConnection: close\r\n" + OK_TAIL
    with ScriptedUpstream([answer]) as upstream:
        answer = exchange(gateway, upstream)
        assert (answer.status, answer.headers["x-folded"], answer.body) == (200, "one two", b"ok")
        assert_clean_after(gateway, upstream, answer)


# -- issue 11, item 3: 1xx answers are informational -----------------------------------------


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n",
])
def test_interim_answers_are_skipped_and_the_final_one_relayed(gateway, interim):
    final = b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nConnection: close\r\n" \
            b"Content-Length: 5\r\n\r\nfinal"
    with ScriptedUpstream([interim, 0.1, final]) as upstream:
        answer = exchange(gateway, upstream)
        assert (answer.status, answer.headers.get("x-final"), answer.body) == \
            (201, "yes", b"final")
        assert "link" not in answer.headers
        assert_clean_after(gateway, upstream, answer)


def test_endless_interim_answers_are_a_502(gateway):
    with ScriptedUpstream([b"HTTP/1.1 103 Early Hints\r\n\r\n" * 200]) as upstream:
        answer = exchange(gateway, upstream)
        assert_json_error(answer)
        assert_clean_after(gateway, upstream, answer)


# -- issue 11, item 1: a reset in the body --------------------------------------------------


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",  # a body read until the connection ends
])
def test_a_reset_in_the_first_64_kib_of_a_long_body_is_a_json_502(gateway, head):
    with ScriptedUpstream([head + b"x" * 1000, 0.2, "reset"]) as upstream:
        answer = exchange(gateway, upstream)
        assert_json_error(answer)
        assert_clean_after(gateway, upstream, answer)


def test_a_reset_after_the_answer_started_cuts_the_connection(gateway):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n"
    with ScriptedUpstream([head + b"x" * 150000, 1.0, "reset"]) as upstream:
        answer = exchange(gateway, upstream)
        assert answer.status == 200
        assert answer.headers["content-length"] == "300000"
        body = answer.body
        assert 0 < len(body) < 300000 and set(body) == {ord("x")}  # cut, nothing spliced in
        assert_clean_after(gateway, upstream, answer)


# -- issue 12, item 4: one deadline for the whole exchange -----------------------------------


def test_a_dribbling_upstream_gets_504_at_the_total_deadline(gateway):
    """A header byte every half second: each read is quick, but the head never ends."""
    dribble: list = [b"HTTP/1.1 200 OK\r\nX-Slow: "]
    for _ in range(120):  # a minute of dribbling
        dribble += [0.5, b"a"]
    with ScriptedUpstream(dribble) as upstream:
        started = time.monotonic()
        answer = exchange(gateway, upstream, timeout=90)
        took = time.monotonic() - started
        assert_json_error(answer, 504)
        assert took < 30, f"answered after {took:.1f} s"  # well before the dribble would end
        assert_clean_after(gateway, upstream, answer)


def test_a_dribbling_body_read_before_the_answer_gets_504(gateway):
    dribble: list = [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"]
    for _ in range(120):
        dribble += [0.5, b"a"]
    with ScriptedUpstream(dribble) as upstream:
        started = time.monotonic()
        answer = exchange(gateway, upstream, timeout=90)
        assert_json_error(answer, 504)
        assert time.monotonic() - started < 30
        assert_clean_after(gateway, upstream, answer)


# -- issue 11, item 5: the name is checked when connecting -----------------------------------


def test_a_name_resolving_to_a_refused_address_is_never_connected_to(start_gateway):
    """``localhost`` resolves to loopback; with loopback refused by GATEWAY_UPSTREAM_DENY, the
    registered name is checked at connect time, for requests and health probes alike."""
    gateway = start_gateway(GATEWAY_WORKERS=1,
                            GATEWAY_UPSTREAM_DENY="127.0.0.0/8,::1/128")
    with ScriptedUpstream([b"HTTP/1.1 200 OK\r\n" + OK_TAIL]) as upstream:
        address = f"http://localhost:{upstream.port}"
        assert gateway.register("named", address).status_code == 201
        # an IP literal in a refused range is refused at registration already
        assert gateway.register("literal", f"http://127.0.0.1:{upstream.port}").status_code \
            == 400
        response = gateway.fresh_get("/named/x", {"Authorization": make_token()})
        assert (response.status_code, response.json()["error"]) == (502, "bad_gateway")
        assert "refused address" in response.json()["message"]
        listing = requests.get(f"{gateway.url}/_gateway/services/named", timeout=5).json()
        assert listing["instances"][0]["in_flight"] == 0
        # (polled, as in assert_clean_after: the worker may not yet have closed the test's
        # own client connections, which are sockets the kernel no longer lists either)
        wait_for(lambda: not leaked_sockets(gateway.worker_pids(), upstream.port),
                 timeout=READY_TIMEOUT, what="no socket left towards the upstream")
        policy = {"health_check": {"path": "/health", "interval": 0.5, "timeout": 0.4}}
        assert requests.put(f"{gateway.url}/_gateway/services/named/policy", json=policy,
                            timeout=5).status_code in (200, 201)

        def last_check():
            listing = requests.get(f"{gateway.url}/_gateway/services/named", timeout=5).json()
            return listing["instances"][0]["last_check"]

        check = wait_for(last_check, timeout=READY_TIMEOUT, what="a health probe")
        assert check["ok"] is False
        assert upstream.requests == []  # nothing ever reached it


# -- issue 11, item 6: health probes go through the same transport ---------------------------


def https_upstream(tmp_path):
    """An https upstream on ``localhost`` with a certificate of a private CA (trustme)."""
    import ssl

    import trustme

    from tests.support import UpstreamServer

    ca = trustme.CA()
    ca_file = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = UpstreamServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, ca_file


@pytest.mark.parametrize("trust", ["bundle setting", "system store (SSL_CERT_FILE)"])
def test_probes_and_traffic_trust_the_same_private_ca(start_gateway, tmp_path, trust):
    server, ca_file = https_upstream(tmp_path)
    try:
        env = ({"GATEWAY_UPSTREAM_CA_BUNDLE": ca_file} if trust == "bundle setting"
               else {"SSL_CERT_FILE": ca_file})
        gateway = start_gateway(GATEWAY_WORKERS=1, **env)
        gateway.register("tls", f"https://localhost:{server.port}")
        policy = {"health_check": {"path": "/status/200", "interval": 1, "timeout": 0.9}}
        requests.put(f"{gateway.url}/_gateway/services/tls/policy", json=policy, timeout=5)

        def last_check():
            listing = requests.get(f"{gateway.url}/_gateway/services/tls", timeout=5).json()
            return listing["instances"][0]["last_check"]

        check = wait_for(last_check, timeout=READY_TIMEOUT, what="a health probe")
        assert check["ok"] is True, check
        # The listing reads the shared view; the worker routes from its copy of it, refreshed
        # a moment later (SYNC_INTERVAL): wait for traffic to pass, not one request's luck.
        gateway.wait_routable("/tls/x", {"Authorization": make_token()}, 200)
    finally:
        server.shutdown()
        server.server_close()


def test_untrusted_https_fails_probes_and_traffic_alike(start_gateway, tmp_path):
    server, _ = https_upstream(tmp_path)
    try:
        gateway = start_gateway(GATEWAY_WORKERS=1)
        gateway.register("tls", f"https://localhost:{server.port}")
        policy = {"health_check": {"path": "/status/200", "interval": 1, "timeout": 0.9}}
        requests.put(f"{gateway.url}/_gateway/services/tls/policy", json=policy, timeout=5)
        check = wait_for(lambda: requests.get(f"{gateway.url}/_gateway/services/tls",
                                              timeout=5).json()["instances"][0]["last_check"],
                         timeout=READY_TIMEOUT, what="a health probe")
        assert check["ok"] is False
    finally:
        server.shutdown()
        server.server_close()


# -- issue 11, item 7: the fast paths change nothing on the wire ------------------------------

DIFFERENTIAL = [
    [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
     b"X-Folded: one\r\n two\r\nX-Latin: caf\xe9\r\nConnection: close\r\n" + OK_TAIL],
    [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\n"
     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
    [b"HTTP/1.1 200 OK\nA: 1\nConnection: close\nContent-Length: 2\n\nok"],
    [b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\n" + b"y" * 100000, "close"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 80000, 1.0, "reset"],
    [MALFORMED_HEADS["a bare CR inside a value (header injection)"]],
    [MALFORMED_HEADS["Content-Length with Transfer-Encoding"]],
]


@pytest.mark.parametrize("script", DIFFERENTIAL, ids=lambda s: repr(s[0][:20]))
def test_the_same_bytes_with_the_fast_paths_on_and_off(gateway, stock_gateway, script):
    """Both ways, the upstream receives the same request and the client the same answer
    (but for the Date header, which tells the time)."""
    answers = []
    name = f"d{next(_names)}"  # the same on both gateways, and the same upstream
    token = make_token()  # and the same token
    with ScriptedUpstream(script) as upstream:
        for each in (gateway, stock_gateway):
            answer = exchange(each, upstream, name=name, token=token,
                              extra="X-Request-ID: diff-1\r\nUser-Agent: @@@SKIP_HEADER@@@\r\n")
            answers.append(re.sub(rb"\r\nDate: [^\r]*", b"", answer.raw))
    # (and for the trace context's parent ids, new for each hop)
    sent = [re.sub(rb"traceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-", b"traceparent: ", r)
            for r in upstream.requests[:2]]
    assert sent[0] == sent[1]
    assert answers[0] == answers[1]
