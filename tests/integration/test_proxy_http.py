"""Forwarding through real gunicorn to real loopback upstreams (README: Proxying)."""

from __future__ import annotations

import http.client
import socket

import pytest
import requests

from tests.conftest import SECRET, make_token
from tests.support import Gateway, RawServer, UpstreamServer, raw_request, wait_for


@pytest.fixture(scope="module")
def upstream():
    """One upstream for the module: it keeps no state but what it saw (cleared per test)."""
    with UpstreamServer() as server:
        yield server


@pytest.fixture(scope="module")
def routed_gateway(tmp_path_factory, upstream):
    """One gateway for the tests that only send traffic through its two routes."""
    gateway = Gateway(tmp_path_factory.mktemp("routed"), GATEWAY_JWT_SECRET=SECRET).start()
    gateway.register("svc", upstream.address)
    gateway.register("based", upstream.address + "/api")
    auth = {"Authorization": f"Bearer {make_token()}"}
    gateway.wait_routable("/svc/", auth)
    gateway.wait_routable("/based/", auth)
    yield gateway
    gateway.discard()


@pytest.fixture
def routed(routed_gateway, upstream):
    """A gateway with ``svc`` -> upstream and ``based`` -> upstream/api, routable everywhere
    (shared by the module's tests), and an upstream that has seen nothing yet."""
    upstream.seen.clear()
    return routed_gateway


@pytest.mark.parametrize("target, expected", [
    ("/svc", "/"),
    ("/svc/greet?x=1", "/greet?x=1"),
    ("/based", "/api"),
    ("/based/greet?x=1&y=2", "/api/greet?x=1&y=2"),
    ("/svc/a%2Fb/c%2fd?q=%41%2f&r=", "/a%2Fb/c%2fd?q=%41%2f&r="),
    ("/svc/%7Euser/caf%C3%A9", "/%7Euser/caf%C3%A9"),
    ("/svc/x?", "/x?"),
    ("/svc//double//slash", "//double//slash"),
])
def test_path_and_query_reach_the_upstream_byte_for_byte(routed, upstream, auth, target,
                                                         expected):
    response = raw_request(routed.port, f"GET {target}", auth)
    assert response.status == 200
    assert response.json()["path"] == expected


def test_absolute_form_is_routed_by_path_only(routed, upstream, auth):
    response = raw_request(routed.port, "GET http://evil.example:25/svc/x?a=1", auth)
    assert response.status == 200
    seen = response.json()
    assert seen["path"] == "/x?a=1"
    assert seen["headers"]["Host"] == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize("target", ["/svc/../etc/passwd", "/svc/%2e%2e/x", "/svc/./x",
                                    "/svc/a/%2E"])
def test_dot_segments_are_400(routed, upstream, target):
    response = raw_request(routed.port, f"GET {target}")
    assert response.status == 400
    assert response.json()["error"] == "bad_request"
    assert upstream.seen == []


def test_every_method_with_bodies(routed, upstream, auth):
    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]:
        response = requests.request(method, routed.url + "/svc/m", headers=auth,
                                    data=b"body" if method in ("POST", "PUT", "PATCH") else None,
                                    timeout=5)
        assert response.status_code == 200, method
        assert upstream.seen[-1]["method"] == method
    assert upstream.seen[2]["body"] == b"body"
    options = requests.options(routed.url + "/svc/m", timeout=5)
    assert options.status_code == 401  # no automatic OPTIONS answer without a token
    trace = requests.request("TRACE", routed.url + "/svc/m", headers=auth, timeout=5)
    assert trace.status_code == 405


def test_chunked_request_body_is_streamed_up(routed, upstream, auth):
    def chunks():
        for i in range(50):
            yield f"chunk-{i:03d};".encode() * 100

    response = requests.post(routed.url + "/svc/upload", data=chunks(), headers=auth, timeout=10)
    assert response.status_code == 200
    assert upstream.seen[-1]["body"] == b"".join(chunks())


def test_large_response_streams_without_growing_worker_memory(start_gateway, upstream, auth):
    gateway = start_gateway(GATEWAY_WORKERS=1)
    gateway.register("big", upstream.address)
    gateway.wait_routable("/big/big/10", auth)
    pid = gateway.worker_pids()[0]

    def peak_rss_kib():
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    before = peak_rss_kib()
    size = 20 * 1024 * 1024
    with requests.get(gateway.url + "/big/big/" + str(size), headers=auth, stream=True,
                      timeout=30) as response:
        assert response.status_code == 200
        received = sum(len(chunk) for chunk in response.iter_content(65536))
    assert received == size
    assert peak_rss_kib() - before < 8 * 1024  # far less than the 20 MiB that went through


def test_set_cookie_lines_are_kept_and_cookies_never_shared(routed, upstream, auth):
    response = requests.get(routed.url + "/svc/cookie", headers=auth, timeout=5)
    raw_cookies = response.raw.headers.getlist("Set-Cookie")
    assert raw_cookies == ["session=s3cret; Path=/", "theme=dark; Path=/"]
    other = make_token(sub="bob")
    echoed = routed.fresh_get("/svc/echo", {"Authorization": other}).json()
    assert "Cookie" not in echoed["headers"]


def test_headers_added_and_removed(routed, upstream):
    token = make_token(sub="carol")
    response = raw_request(routed.port, "GET /svc/h", {
        "Authorization": token, "X-Authenticated-Subject": "root", "X-Forwarded-For": "1.2.3.4",
        "Connection": "X-Private", "X-Private": "secret", "X-Request-ID": "req-42",
        "Host": "api.example",
    })
    headers = response.json()["headers"]
    assert response.getheader("X-Request-ID") == "req-42"
    assert headers["X-Authenticated-Subject"] == "carol"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Host"] == "api.example"
    assert headers["X-Forwarded-Prefix"] == "/svc"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Request-ID"] == "req-42"
    assert "X-Private" not in headers
    assert headers["Authorization"] == token
    # Nothing the client did not send: no client library's User-Agent or Accept-Encoding.
    assert "User-Agent" not in headers and "Accept-Encoding" not in headers


def test_client_user_agent_and_accept_encoding_go_up_as_sent(routed, upstream, auth):
    sent = {**auth, "User-Agent": "curl/8.5.0", "Accept-Encoding": "gzip, br",
            "X-Odd": "@@@SKIP_HEADER@@@"}  # urllib3's marker, as a plain value
    headers = raw_request(routed.port, "GET /svc/h", sent).json()["headers"]
    assert (headers["User-Agent"], headers["Accept-Encoding"], headers["X-Odd"]) == \
        ("curl/8.5.0", "gzip, br", "@@@SKIP_HEADER@@@")


def test_redirects_and_statuses_pass_through(routed, upstream, auth):
    response = requests.get(routed.url + "/svc/redirect", headers=auth, allow_redirects=False,
                            timeout=5)
    assert (response.status_code, response.headers["Location"]) == (302, "/elsewhere")
    assert response.content == b"see elsewhere"
    for status in (201, 204, 404, 500, 503):
        assert requests.get(f"{routed.url}/svc/status/{status}", headers=auth,
                            timeout=5).status_code == status


def test_failure_mid_body_cuts_the_connection(routed, upstream, auth):
    conn = http.client.HTTPConnection("127.0.0.1", routed.port, timeout=10)
    try:
        conn.request("GET", "/svc/truncate", headers=auth)
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead) as info:
            response.read()
        assert info.value.partial == b"0123456789"  # no error text spliced in
    finally:
        conn.close()


def test_small_body_cut_short_is_a_502(routed, upstream, auth):
    """A body that fits in one read is read whole before the answer starts, so an upstream
    hanging up mid-body can still be reported as a clean 502."""
    response = requests.get(f"{routed.url}/svc/truncate-small", headers=auth, timeout=10)
    assert error_of(response) == (502, "bad_gateway")


# -- the error table, each status produced for real ----------------------------------------


def error_of(response: requests.Response) -> tuple[int, str]:
    body = response.json()
    assert body["request_id"] == response.headers["X-Request-ID"]
    return response.status_code, body["error"]


def test_401_404_405_413(start_gateway, upstream, auth):
    gateway = start_gateway(GATEWAY_MAX_BODY_BYTES=1000)
    gateway.register("svc", upstream.address)
    gateway.wait_routable("/svc/", auth)
    no_token = requests.get(gateway.url + "/svc/", timeout=5)
    assert error_of(no_token) == (401, "unauthorized")
    assert no_token.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    bad = requests.get(gateway.url + "/svc/", headers={"Authorization": "Bearer x.y.z"}, timeout=5)
    assert bad.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    assert error_of(requests.get(gateway.url + "/nope", headers=auth, timeout=5)) == \
        (404, "service_not_found")
    assert error_of(requests.request("TRACE", gateway.url + "/svc", headers=auth, timeout=5)) == \
        (405, "method_not_allowed")
    assert error_of(requests.get(gateway.url + "/register_service", timeout=5)) == \
        (405, "method_not_allowed")
    upstream.seen.clear()
    too_big = requests.post(gateway.url + "/svc/", data=b"x" * 1001, headers=auth, timeout=5)
    assert error_of(too_big) == (413, "payload_too_large")

    def chunked():
        for _ in range(20):
            yield b"y" * 100

    too_big_chunked = requests.post(gateway.url + "/svc/", data=chunked(), headers=auth,
                                    timeout=5)
    assert error_of(too_big_chunked) == (413, "payload_too_large")
    assert all(len(seen["body"]) <= 1000 for seen in upstream.seen)


def test_502_refused_reset_and_broken_http(gateway, auth):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
    gateway.register("refused", f"http://127.0.0.1:{refused_port}")
    with RawServer("reset") as reset, RawServer("garbage") as garbage:
        gateway.register("reset", reset.address)
        gateway.register("garbage", garbage.address)
        for name in ("refused", "reset", "garbage"):
            gateway.wait_routable(f"/{name}/", auth, status=502)
            assert error_of(gateway.fresh_get(f"/{name}/", auth)) == (502, "bad_gateway")


def test_503_when_no_instance_can_take_traffic(gateway, upstream, auth):
    instance = gateway.register("drained", upstream.address).json()["instance"]
    gateway.wait_routable("/drained/", auth)
    url = f"{gateway.url}/_gateway/services/drained/instances/{instance['id']}/drain"
    assert requests.put(url, timeout=5).json()["health"] == "draining"
    gateway.wait_routable("/drained/", auth, status=503)
    assert error_of(gateway.fresh_get("/drained/", auth)) == (503, "no_healthy_instance")


def test_504_when_upstream_answers_too_slowly(start_gateway, upstream, auth):
    gateway = start_gateway(GATEWAY_READ_TIMEOUT=0.5)
    gateway.register("slow", upstream.address)
    gateway.wait_routable("/slow/slow/0", auth)
    assert error_of(gateway.fresh_get("/slow/slow/3", auth)) == (504, "gateway_timeout")


def test_504_when_upstream_does_not_accept_the_connection(start_gateway, auth):
    # A listener with a full accept queue: Linux drops further SYNs, so connects hang.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        gateway = start_gateway(GATEWAY_CONNECT_TIMEOUT=0.3)
        gateway.register("blackhole", f"http://127.0.0.1:{port}")
        gateway.wait_routable("/blackhole/", auth, status=504, timeout=30)
        assert error_of(gateway.fresh_get("/blackhole/", auth)) == (504, "gateway_timeout")
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_https_upstream_is_verified(start_gateway, tmp_path, auth):
    import datetime
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = UpstreamServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"https://localhost:{server.port}"
        untrusting = start_gateway(data_dir=tmp_path / "a")
        untrusting.register("tls", address)
        untrusting.wait_routable("/tls/", auth, status=502)
        trusting = start_gateway(data_dir=tmp_path / "b", GATEWAY_UPSTREAM_CA_BUNDLE=cert_file)
        trusting.register("tls", address)
        trusting.wait_routable("/tls/", auth, status=200)
    finally:
        server.shutdown()
        server.server_close()


def test_client_hanging_up_mid_body_releases_the_upstream(start_gateway, upstream, auth):
    gateway = start_gateway(GATEWAY_WORKERS=1)
    gateway.register("big", upstream.address)
    gateway.wait_routable("/big/big/10", auth)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request("GET", "/big/big/200000000", headers=auth)
    response = conn.getresponse()
    assert response.read(65536)
    in_flight = requests.get(gateway.url + "/_gateway/services/big", timeout=5).json()
    assert in_flight["instances"][0]["in_flight"] == 1
    conn.close()  # the client goes away with most of the body unread

    def released():
        listing = requests.get(gateway.url + "/_gateway/services/big", timeout=5).json()
        return listing["instances"][0]["in_flight"] == 0

    wait_for(released, timeout=10, what="the upstream call to be closed")
