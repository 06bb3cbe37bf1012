"""The front door in process: the request's one view, loops, the gateway's own address, and
gunicorn's error pages made JSON."""

from __future__ import annotations

import ipaddress
import json

import pytest

from gateway_app import front
from gateway_app.front import CapturedErrorPage, FrontDoor, _gateway_hops, is_own_address
from tests.conftest import make_token


def read(environ: dict, trusted: str = "", node: str = "n1"):
    nets = tuple(ipaddress.ip_network(n) for n in trusted.split(",") if n)
    base = {"REQUEST_METHOD": "GET", "RAW_URI": "/svc/x?q=1", "REMOTE_ADDR": "10.0.0.1",
            "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "gw", "wsgi.url_scheme": "http"}
    base.update(environ)
    return FrontDoor(lambda e, s: [], nets, node).read(base)


def test_the_view_is_taken_from_the_raw_target_and_the_tcp_peer():
    view = read({"PATH_INFO": "/other/y", "SCRIPT_NAME": "/svc", "HTTP_X_FORWARDED_PROTO":
                 "https", "HTTP_X_FORWARDED_FOR": "1.2.3.4"})
    assert (view.service, view.rest, view.query) == ("svc", "/x", "?q=1")
    assert (view.client, view.scheme, view.host, view.forwarded_for) == (
        "10.0.0.1", "http", "gw", "")
    assert view.relayed  # forwarding headers from an untrusted peer
    assert view.error is None


def test_a_trusted_proxy_names_the_client_scheme_and_host():
    view = read({"HTTP_X_FORWARDED_FOR": "203.0.113.7, 10.0.0.9", "HTTP_X_FORWARDED_PROTO":
                 "HTTPS", "HTTP_X_FORWARDED_HOST": "api.example"}, trusted="10.0.0.0/8")
    assert (view.client, view.scheme, view.host) == ("203.0.113.7", "https", "api.example")
    assert view.forwarded_for == "203.0.113.7, 10.0.0.9"
    assert not view.relayed
    assert read({"HTTP_X_FORWARDED_FOR": "junk"}, trusted="10.0.0.0/8").error.code == 400


def test_the_service_segment_is_kept_as_sent():
    assert read({"RAW_URI": "/%65cho/a"}).service == "%65cho"
    assert read({"RAW_URI": "http://host:1/svc/a?b"}).service == "svc"


@pytest.mark.parametrize("target", ["/svc/..;/a", "/svc/%2e%2e%2fa", "/svc/a b", "/svc/#x",
                                    "/svc/\x01", "/svc/..%5ca"])
def test_malformed_targets_are_refused_before_routing(target):
    assert read({"RAW_URI": target}).error.code == 400


def test_loops_and_too_many_gateways_are_508():
    assert read({"HTTP_VIA": "1.1 gateway-n1"}).error.code == 508
    assert read({"HTTP_VIA": "1.0 fred, 1.1 gateway-n1 (x)"}).error.code == 508
    many = ", ".join(f"1.1 gateway-g{i}" for i in range(front.MAX_GATEWAY_HOPS + 1))
    assert read({"HTTP_VIA": many}).error.code == 508
    assert read({"HTTP_VIA": "1.1 x" * 5000}).error.code == 508
    fine = read({"HTTP_VIA": "1.1 gateway-other, 1.1 squid"})
    assert fine.error is None and fine.relayed
    assert _gateway_hops("1.1 gateway-a, 1.1 gateway-b", "gateway-b") == (2, True)


def test_host_and_transfer_codings():
    assert read({"HTTP_HOST": ""}).error.code == 400
    assert read({"HTTP_HOST": "", "SERVER_PROTOCOL": "HTTP/1.0"}).error is None
    assert read({"HTTP_TRANSFER_ENCODING": "gzip, chunked"}).error.code == 501
    assert read({"HTTP_TRANSFER_ENCODING": "Chunked"}).error is None


def test_request_ids_are_kept_when_sane():
    assert read({"HTTP_X_REQUEST_ID": "abc-1"}).request_id == "abc-1"
    assert read({"HTTP_X_REQUEST_ID": "a b"}).request_id != "a b"


@pytest.mark.parametrize(("address", "bind", "own"), [
    ("http://127.0.0.1:8080/x", "127.0.0.1:8080", True),
    ("http://localhost:8080", "127.0.0.1:8080", True),
    ("http://127.0.0.1:8081", "127.0.0.1:8080", False),
    ("http://127.0.0.2:8080", "127.0.0.1:8080", False),
    ("http://127.0.0.2:8080", "0.0.0.0:8080", True),
    ("http://localhost", "127.0.0.1:80", True),
    ("https://localhost", "127.0.0.1:443", True),
    ("http://127.0.0.1:8080", "unix:/tmp/gw.sock", False),
    ("http://no-such-host.invalid:8080", "127.0.0.1:8080", False),
])
def test_the_gateways_own_address(address, bind, own):
    assert is_own_address(address, bind) is own


def test_captured_gunicorn_pages_become_the_json_error_shape():
    page = CapturedErrorPage()
    page.sendall(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                 b"Content-Type: text/html\r\n\r\n<html><body><h1><p>Too Large</p></h1>\n"
                 b"    Error parsing headers: &#x27;limit&#x27;\n  </body></html>")
    head, _, body = page.json().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Content-Type: application/json" in head
    doc = json.loads(body)
    assert doc["error"] == "bad_request"
    assert doc["message"] == "Error parsing headers: 'limit'"
    empty = CapturedErrorPage()
    assert b"HTTP/1.1 400 Bad Request" in empty.json()


def test_a_client_header_cannot_route_in_process(client, upstream):
    # The Flask test client has no gunicorn below it; the view still decides alone.
    response = client.get("/_gateway/health", headers={"SCRIPT_NAME": "/x"})
    assert response.status_code == 200
    assert client.post("/register_service", data="echo,http://127.0.0.1:9").status_code == 201
    upstream.get("http://127.0.0.1:9/a", body="ok")
    token = make_token()
    assert client.get("/echo/a", headers={"Authorization": f"Bearer {token}"}).data == b"ok"
    response = client.get("/%65cho/a", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 404
    assert response.get_json()["error"] == "service_not_found"


def test_wrong_admin_credentials_from_one_address_get_429_once_its_bucket_is_empty(make_app):
    app = make_app(GATEWAY_ADMIN_ALLOW="10.9.0.0/16", GATEWAY_ADMIN_TOKEN="a" * 40,
                   GATEWAY_AUTH_FAILURE_LIMIT="1/minute, burst=3")
    client = app.test_client()
    statuses = [client.get("/_gateway/services", headers={"Authorization": "Bearer wrong"})
                .status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    refused = client.get("/_gateway/services", headers={"Authorization": "Bearer wrong"})
    assert refused.get_json()["error"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert client.get("/_gateway/services").status_code == 401  # no credential: not counted
    ok = client.get("/_gateway/services", headers={"Authorization": "Bearer " + "a" * 40})
    assert ok.status_code == 200


def test_a_valid_traceparent_is_continued_and_a_malformed_one_replaced():
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    view = read({"HTTP_TRACEPARENT": incoming, "HTTP_TRACESTATE": "congo=t61rcWkgMzE"})
    assert (view.trace_id, view.trace_flags) == ("4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert view.tracestate == "congo=t61rcWkgMzE"
    hop = front.traceparent(view)
    version, trace, parent, flags = hop.split("-")
    assert (version, trace, flags) == ("00", view.trace_id, "01")
    assert parent != "00f067aa0ba902b7" and len(parent) == 16
    assert front.traceparent(view) != hop  # a new parent id per hop
    # A later version with more fields is read by its first four.
    assert read({"HTTP_TRACEPARENT": "cc-" + incoming[3:] + "-what"}).trace_id == view.trace_id
    for bad in ("", "garbage", incoming.replace("00-", "ff-", 1), incoming + "-extra",
                "00-" + "0" * 32 + "-00f067aa0ba902b7-01", incoming[:-19] + "0" * 16 + "-01",
                incoming.upper().replace("-01", "-0g")):
        started = read({"HTTP_TRACEPARENT": bad, "HTTP_TRACESTATE": "a=b"})
        assert started.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736", bad
        assert len(started.trace_id) == 32 and started.trace_flags == "01"
        assert started.tracestate == ""
    long_state = read({"HTTP_TRACEPARENT": incoming, "HTTP_TRACESTATE": "a=" + "b" * 600})
    assert long_state.tracestate == ""


def test_trace_context_reaches_the_upstream_and_the_access_log(make_app, upstream):
    import io
    import logging
    app = make_app()
    client = app.test_client()
    client.post("/register_service", data="svc,http://127.0.0.1:9")
    upstream.get("http://127.0.0.1:9/x", body="ok")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    access = logging.getLogger("gateway.access")
    access.addHandler(handler)
    try:
        incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        client.get("/svc/x", headers={"Authorization": f"Bearer {make_token()}",
                                      "traceparent": incoming, "tracestate": "k=v"}).close()
        sent = upstream.calls[-1].request.headers
        assert sent["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        assert sent["traceparent"].endswith("-00")
        assert sent["tracestate"] == "k=v"
        client.get("/svc/x", headers={"Authorization": f"Bearer {make_token()}",
                                      "traceparent": "junk", "tracestate": "k=v"})
        sent = upstream.calls[-1].request.headers
        assert sent["traceparent"] != "junk" and "tracestate" not in sent
    finally:
        access.removeHandler(handler)
    assert "4bf92f3577b34da6a3ce929d0e0e4736" in stream.getvalue()
