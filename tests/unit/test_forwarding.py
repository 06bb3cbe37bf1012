"""Talking to upstreams through the Forwarder, over real loopback sockets: timeouts and the
exchange's deadline, connect-time address checks (names resolved by a stub, never by DNS),
and the translation of every transport error into the gateway's own."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from gateway_app.errors import BadGateway, GatewayTimeout
from gateway_app.forwarding import Forwarder, UpstreamAborted, release, stream_body
from tests.support import ScriptedUpstream


class Instance:
    scheme, host, service, id, base_path = "http", "127.0.0.1", "svc", "i1", ""

    def __init__(self, port: int) -> None:
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"


#: Every fast path (the tests marked "fast" run with them, "stock" without).
FAST = ("kernel_timeouts", "header_lines", "header_block")


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
        assert b"".join(stream_body(first)) == b"hello"
        release(first)

        second = forwarder.send(instance, "GET", "/", {"Host": "x"}, None, 2, 5)
        assert second.status_code == 201
        assert second.headers["X-Folded"] == "one two"  # unfolded, as urllib3 always did
        assert b"".join(stream_body(second)) == b"ok"
        release(second)
    finally:
        forwarder.close()
        server.close()
    thread.join(5)
    assert requests_seen[0].startswith(b"GET /a%2fb?q=1 HTTP/1.1\r\n")


class ScriptedConnection:
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
    b"".join(stream_body(response))
    release(response)
    return response, time.monotonic() - started


def test_read_timeout_holds_on_a_reused_connection_and_follows_each_request():
    upstream = ScriptedConnection([(0, OK), (0, OK), (5, OK)])
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
    upstream = ScriptedConnection([(0, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")])
    forwarder = Forwarder(pool_size=1)
    try:
        response = forwarder.send(Instance(upstream.port), "GET", "/", {"Host": "x"}, None, 2,
                                  0.3)
        started = time.monotonic()
        with pytest.raises(UpstreamAborted):
            b"".join(stream_body(response))
        assert time.monotonic() - started < 2
        release(response)
    finally:
        forwarder.close()
        upstream.close()


def test_send_timeout_holds_when_the_upstream_stops_reading():
    upstream = ScriptedConnection([(0, None)])  # reads one chunk, then nothing more
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


# -- every transport error becomes the gateway's own ------------------------------------------


@pytest.mark.parametrize("script, error, kind", [
    ([b"HTTP/1.1 200 OK\r\nX(Bad): 1\r\n\r\n"], BadGateway, "protocol"),
    ([b"HTTP/1.1 999 Odd\r\n\r\n"], BadGateway, "protocol"),
    ([b"garbage\r\n\r\n"], BadGateway, "protocol"),
    (["reset"], BadGateway, "reset"),
    (["close"], BadGateway, "reset"),
])
def test_transport_errors_are_translated_in_one_place(script, error, kind):

    with ScriptedUpstream(script) as upstream:
        forwarder = Forwarder(pool_size=1)
        try:
            with pytest.raises(error) as info:
                forwarder.send(Instance(upstream.port), "GET", "/", {"Host": "x"}, None, 2, 5)
        finally:
            forwarder.close()
    assert info.value.kind == kind
    assert "127.0.0.1" not in info.value.description  # the client is not told the address


# -- connect-time address checks (issue 11, item 5) -------------------------------------------


class Named:
    """An instance registered under a host name (resolved by the test's stub)."""

    scheme, service, id, base_path = "http", "svc", "i1", ""

    def __init__(self, host: str, port: int = 80, scheme: str = "http") -> None:
        self.scheme, self.host, self.port = scheme, host, port
        self.origin = f"{scheme}://{host}:{port}"


class StubResolver:
    """Answers ``getaddrinfo`` from a table: each name to a list of addresses, or to a list of
    such lists, one per successive lookup. Nothing goes to DNS."""

    def __init__(self, table: dict[str, list]) -> None:
        self.table = table
        self.lookups: list[str] = []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.lookups.append(host)
        answer = self.table.get(host, [])
        if answer and isinstance(answer[0], list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if not answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (ip, port, 0, 0) if ":" in ip else (ip, port)) for ip in answer]


@pytest.fixture
def loopback_only(monkeypatch):
    """Whatever the check under test does, no connection leaves loopback: urllib3's
    ``create_connection`` refuses anything else (and records what was tried)."""
    import urllib3.util.connection

    real = urllib3.util.connection.create_connection
    tried: list[str] = []

    def create_connection(address, *args, **kwargs):
        tried.append(address[0])
        if address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"a connection to {address[0]} was attempted")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)
    return tried


REFUSED = [
    "169.254.169.254", "169.254.0.1", "fd00:ec2::254", "64:ff9b::a9fe:a9fe",
    "::ffff:169.254.169.254", "100.100.100.200", "192.0.0.192", "168.63.129.16", "0.0.0.0",
    "0.1.2.3", "::", "224.0.0.1", "255.255.255.255", "ff02::1", "fe80::1",
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])
@pytest.mark.parametrize("address", REFUSED)
def test_a_name_resolving_to_a_refused_address_is_never_connected_to(loopback_only, address,
                                                                     fast):
    from gateway_app.addresses import AddressPolicy

    resolver = StubResolver({"evil.test": [address]})
    forwarder = Forwarder(pool_size=1, addresses=AddressPolicy(resolve=resolver),
                          fast_paths=frozenset(FAST) if fast else frozenset())
    try:
        with pytest.raises(BadGateway) as info:
            forwarder.send(Named("evil.test"), "GET", "/", {"Host": "evil.test"}, None, 2, 5)
    finally:
        forwarder.close()
    assert info.value.kind == "address_refused" and info.value.safe_to_retry
    assert "refused address" in info.value.description
    assert resolver.lookups == ["evil.test"] and loopback_only == []


def test_one_refused_address_among_several_refuses_the_name(loopback_only):
    from gateway_app.addresses import AddressPolicy

    resolver = StubResolver({"mixed.test": ["127.0.0.1", "169.254.169.254"]})
    forwarder = Forwarder(pool_size=1, addresses=AddressPolicy(resolve=resolver))
    try:
        with pytest.raises(BadGateway, match="refused address"):
            forwarder.send(Named("mixed.test"), "GET", "/", {"Host": "x"}, None, 2, 5)
    finally:
        forwarder.close()
    assert loopback_only == []


@pytest.mark.parametrize("bind, deny, address, refused", [
    ("127.0.0.1:8080", (), "127.0.0.1", True),  # the gateway itself
    ("127.0.0.1:8080", (), "127.0.0.2", False),
    ("0.0.0.0:8080", (), "127.0.0.5", True),  # listening everywhere: all of loopback is it
    ("127.0.0.1:9", (), "127.0.0.1", False),  # another port
    (None, ("10.0.0.0/8",), "10.1.2.3", True),  # GATEWAY_UPSTREAM_DENY
    (None, ("10.0.0.0/8",), "::ffff:10.1.2.3", True),
    (None, (), "10.1.2.3", False),
])
def test_the_gateways_own_address_and_the_deny_setting(bind, deny, address, refused):
    import ipaddress

    from gateway_app.addresses import AddressPolicy

    policy = AddressPolicy([ipaddress.ip_network(n) for n in deny], bind,
                           resolve=StubResolver({}))
    assert (policy.refusal(ipaddress.ip_address(address), 8080) is not None) is refused


def test_dns_rebinding_after_a_good_answer_is_caught_on_the_next_connection(loopback_only):
    """The name is resolved and checked on every new connection, and the connection goes to
    the address checked: a second lookup cannot slip another address in."""
    from gateway_app.addresses import AddressPolicy

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    with ScriptedUpstream([answer]) as upstream:
        resolver = StubResolver({"rebind.test": [["127.0.0.1"], ["169.254.169.254"]]})
        forwarder = Forwarder(pool_size=1, addresses=AddressPolicy(resolve=resolver))
        instance = Named("rebind.test", upstream.port)
        try:
            first = forwarder.send(instance, "GET", "/", {"Host": "rebind.test"}, None, 2, 5)
            assert b"".join(stream_body(first)) == b"ok"
            release(first)
            with pytest.raises(BadGateway, match="refused address"):
                forwarder.send(instance, "GET", "/", {"Host": "rebind.test"}, None, 2, 5)
        finally:
            forwarder.close()
        assert resolver.lookups == ["rebind.test", "rebind.test"]
        assert len(upstream.requests) == 1
        assert upstream.requests[0].startswith(b"GET / HTTP/1.1\r\nHost: rebind.test\r\n")
        assert loopback_only == ["127.0.0.1"]


def test_a_name_with_several_addresses_falls_back_to_the_next_checked_one(loopback_only):
    from gateway_app.addresses import AddressPolicy

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    with ScriptedUpstream([answer]) as upstream:
        resolver = StubResolver({"two.test": ["::1", "127.0.0.1"]})  # nothing on ::1 there
        forwarder = Forwarder(pool_size=1, addresses=AddressPolicy(resolve=resolver))
        try:
            response = forwarder.send(Named("two.test", upstream.port), "GET", "/",
                                      {"Host": "two.test"}, None, 2, 5)
            assert response.status_code == 200
            release(response)
        finally:
            forwarder.close()
    assert loopback_only == ["::1", "127.0.0.1"]


def test_a_name_that_does_not_resolve_is_a_502_safe_to_retry(loopback_only):
    from gateway_app.addresses import AddressPolicy

    forwarder = Forwarder(pool_size=1, addresses=AddressPolicy(resolve=StubResolver(
        {"nowhere.test": []})))
    try:
        with pytest.raises(BadGateway) as info:
            forwarder.send(Named("nowhere.test"), "GET", "/", {"Host": "x"}, None, 2, 5)
    finally:
        forwarder.close()
    assert info.value.kind == "name_unresolved" and info.value.safe_to_retry


# -- one deadline per exchange (issue 12, item 4) ---------------------------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])
def test_the_exchange_deadline_cuts_a_dribbling_head(fast):
    from gateway_app.transport import Deadline

    dribble: list = [b"HTTP/1.1 200 OK\r\n"]
    for _ in range(100):
        dribble += [0.1, b"X"]  # each byte well within the read timeout
    with ScriptedUpstream(dribble) as upstream:
        forwarder = Forwarder(pool_size=1, fast_paths=frozenset(FAST) if fast else frozenset())
        started = time.monotonic()
        try:
            with pytest.raises(GatewayTimeout) as info:
                forwarder.send(Instance(upstream.port), "GET", "/", {"Host": "x"}, None, 2, 5,
                               Deadline(0.5))
        finally:
            forwarder.close()
        assert 0.4 < time.monotonic() - started < 5  # not the ten seconds of dribbling
        assert info.value.kind == "timeout"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])
def test_the_exchange_deadline_cuts_a_dribbling_head_over_tls(tmp_path, fast):
    """The TLS context makes every https socket a deadline-bound one (``sslsocket_class``);
    the certificate is checked against the registered name while the connection goes to the
    address checked."""
    import ssl

    import trustme

    from gateway_app.addresses import AddressPolicy
    from gateway_app.transport import Deadline

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("upstream.test").configure_cert(context)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        conn, _ = server.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\n")
            for _ in range(100):  # ten seconds of dribbling, each byte well within 5 s
                if stop.wait(0.1):
                    return
                tls.sendall(b"X")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    resolver = StubResolver({"upstream.test": ["127.0.0.1"]})
    forwarder = Forwarder(pool_size=1, ca_bundle=str(ca_file),
                          addresses=AddressPolicy(resolve=resolver),
                          fast_paths=frozenset(FAST) if fast else frozenset())
    started = time.monotonic()
    try:
        with pytest.raises(GatewayTimeout):
            forwarder.send(Named("upstream.test", server.getsockname()[1], "https"), "GET", "/",
                           {"Host": "upstream.test"}, None, 2, 5, Deadline(0.7))
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        forwarder.close()
        server.close()
        thread.join(5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])
def test_without_a_deadline_the_read_timeout_alone_applies(fast):

    dribble: list = [b"HTTP/1.1 200 OK\r\n", 0.3, b"Content-Length: 2\r\n", 0.3, b"\r\nok"]
    with ScriptedUpstream(dribble) as upstream:
        forwarder = Forwarder(pool_size=1, fast_paths=frozenset(FAST) if fast else frozenset())
        try:
            response = forwarder.send(Instance(upstream.port), "GET", "/", {"Host": "x"}, None,
                                      2, 1)
            assert b"".join(stream_body(response)) == b"ok"
            release(response)
        finally:
            forwarder.close()


def test_a_streamed_body_after_the_head_is_not_held_to_the_deadline():
    """Once the head is in, the body streams under the per-read timeout only."""
    from gateway_app.transport import Deadline

    script: list = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"]
    for _ in range(4):
        script += [0.3, b"x"]
    with ScriptedUpstream(script) as upstream:
        forwarder = Forwarder(pool_size=1)
        try:
            response = forwarder.send(Instance(upstream.port), "GET", "/", {"Host": "x"}, None,
                                      2, 5, Deadline(0.5))
            assert b"".join(stream_body(response)) == b"xxxx"  # took 1.2 s, past the deadline
            release(response)
        finally:
            forwarder.close()


def test_a_probe_goes_through_the_same_transport():

    with ScriptedUpstream([b"HTTP/1.1 204 No Content\r\n\r\n"]) as upstream:
        forwarder = Forwarder(pool_size=1)
        try:
            assert forwarder.probe(Instance(upstream.port), "/health", 2) == 204
        finally:
            forwarder.close()
    assert upstream.requests[0] == (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                    b"User-Agent: gateway-health-check\r\n\r\n" % upstream.port)

