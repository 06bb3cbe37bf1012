"""The front door over HTTP, against real gunicorn with the gateway's default settings: each
finding of the outsider's attack (issue 10), reproduced, and what the gateway does now."""

from __future__ import annotations

import json

import requests

from tests.conftest import make_token
from tests.support import (
    Relay,
    UpstreamServer,
    parse_response,
    raw_request,
    send_raw,
)


def bearer(**claims) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(**claims)}"}


def put_policy(gateway, name: str, policy: dict) -> None:
    answer = requests.put(f"{gateway.url}/_gateway/services/{name}/policy", json=policy,
                          timeout=10)
    assert answer.status_code in (200, 201), answer.text


def instance_of(gateway, name: str) -> dict:
    return gateway.services()["services"][0]["instances"][0] if name else {}


def listing(gateway, name: str) -> dict:
    return requests.get(f"{gateway.url}/_gateway/services/{name}", timeout=10).json()


# -- 1. a client header must not move where a request goes ----------------------------------


def test_a_script_name_header_cannot_reroute_a_public_request_to_a_protected_service(
        gateway, upstream):
    with UpstreamServer() as secret:
        assert gateway.register("pub", upstream.address).status_code == 201
        assert gateway.register("secret", secret.address).status_code == 201
        put_policy(gateway, "pub", {"auth": "none"})
        gateway.wait_routable("/pub/x", {})

        answer = raw_request(gateway.port, "GET /pub/secret/x",
                             {"Host": "gw", "SCRIPT_NAME": "/pub", "PATH_INFO": "/secret/x"})
        # The request names "pub": it goes there, as sent, and nowhere else.
        assert answer.status == 200
        assert secret.seen == []
        assert upstream.seen[-1]["path"] == "/secret/x"


def test_a_client_x_forwarded_proto_is_not_believed_without_trusted_proxies(gateway, upstream):
    gateway.register("echo", upstream.address)
    gateway.wait_routable("/echo/x", bearer())
    answer = requests.get(f"{gateway.url}/echo/x", timeout=10, headers={
        **bearer(), "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
        "X-Forwarded-For": "10.9.9.9"})
    sent = answer.json()["headers"]
    assert sent["X-Forwarded-Proto"] == "http"
    assert sent["X-Forwarded-Host"] == f"127.0.0.1:{gateway.port}"
    assert sent["X-Forwarded-For"] == "127.0.0.1"


# -- 2. loops through the gateway's own address --------------------------------------------


def test_registering_the_gateways_own_address_is_refused(gateway):
    for address in (f"http://127.0.0.1:{gateway.port}/loop", f"http://localhost:{gateway.port}",
                    f"http://[::ffff:127.0.0.1]:{gateway.port}/x"):
        answer = gateway.register("loop", address)
        assert answer.status_code == 400, address
        assert "listens" in answer.json()["message"]
    assert gateway.services()["services"] == []


def test_a_request_that_comes_back_through_a_relay_is_refused_as_a_loop(gateway):
    with Relay(gateway.port) as relay:
        # The relay passes every request back to the gateway, under the same path.
        assert gateway.register("loop", relay.address + "/loop").status_code == 201
        gateway.wait_routable("/loop/x", bearer(), status=508)
        relay.seen.clear()
        answer = requests.get(f"{gateway.url}/loop/x", headers=bearer(), timeout=10)
        assert answer.status_code == 508
        assert answer.json()["error"] == "loop_detected"
        assert len(relay.seen) == 1  # one trip round, then refused: no recursion


# -- 3. a relayed request never has the relay's admin rights -------------------------------


def test_a_token_holder_gets_no_admin_rights_through_a_local_relay(start_gateway):
    gateway = start_gateway(GATEWAY_ADMIN_ALLOW="127.0.0.1/32")
    outsider = {"source": "127.0.0.5"}  # not admin-allowed
    with Relay(gateway.port) as passes_all, \
            Relay(gateway.port, drop=frozenset({"via"})) as drops_via:
        # (stripper first: a worker that routes relay has a snapshot at least as new, so it
        # knows stripper too; stripper's own answers cannot tell a worker that does not)
        assert gateway.register("stripper", drops_via.address).status_code == 201
        assert gateway.register("relay", passes_all.address).status_code == 201
        gateway.wait_routable("/relay/x", bearer(), status=508)
        token = make_token()
        for service, status in (("relay", 508), ("stripper", 401)):
            for request in (f"GET /{service}/_gateway/services HTTP/1.1",
                            f"PUT /{service}/_gateway/services/pub/policy HTTP/1.1"):
                body = b'{"auth": "none"}' if request.startswith("PUT") else b""
                data = (f"{request}\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode() + body
                got, _, _ = parse_response(send_raw(gateway.port, data, half_close=False,
                                                    **outsider))
                assert got == status, (service, request)
    policy = requests.get(f"{gateway.url}/_gateway/services/pub/policy", timeout=10)
    assert policy.status_code == 404  # nothing was set
    # The outsider itself is refused too, and an admin-allowed caller is not.
    direct = send_raw(gateway.port, b"GET /_gateway/services HTTP/1.1\r\nHost: gw\r\n"
                      b"Connection: close\r\n\r\n", half_close=False, **outsider)
    assert parse_response(direct)[0] == 401
    assert requests.get(f"{gateway.url}/_gateway/services", timeout=10).status_code == 200


# -- 4. the service segment is matched as sent ----------------------------------------------


def test_a_percent_encoded_service_name_is_not_the_service(gateway, upstream):
    gateway.register("echo", upstream.address)
    put_policy(gateway, "echo", {"rate_limit": "1/hour"})
    # Every worker has the policy: a worker without it would answer 200 as well, so the wait
    # is for the warm-up client's 429 (its one request an hour spent) on every worker.
    gateway.wait_routable("/echo/x", bearer(sub="warmup"), status=429)
    upstream.seen.clear()
    token = make_token(sub="someone")
    assert raw_request(gateway.port, "GET /%65cho/a",
                       {"Host": "gw", "Authorization": f"Bearer {token}"}).status == 404
    assert raw_request(gateway.port, "GET /%65cho/a", {"Host": "gw"}).status == 401
    assert upstream.seen == []
    # The service itself, with its policy: one request an hour.
    assert raw_request(gateway.port, "GET /echo/a",
                       {"Host": "gw", "Authorization": f"Bearer {token}"}).status == 200
    assert raw_request(gateway.port, "GET /echo/a",
                       {"Host": "gw", "Authorization": f"Bearer {token}"}).status == 429


# -- 5. a client that stops sending its body -------------------------------------------------


def _post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: gw\r\n"
            f"Authorization: Bearer {make_token()}\r\nContent-Length: {length}\r\n\r\n").encode()


def test_a_body_cut_short_is_the_clients_fault_not_the_instances(gateway, upstream):
    gateway.register("echo", upstream.address)
    gateway.wait_routable("/echo/x", bearer())
    for declared, sent in ((100, 10), (100_000, 1000)):  # kept whole, and streamed up
        answer = send_raw(gateway.port, _post_head("/echo/x", declared) + b"x" * sent)
        status, headers, body = parse_response(answer)
        assert status == 400, answer[:300]
        assert json.loads(body)["error"] == "bad_request"
        assert "ended after" in json.loads(body)["message"]
    instance = gateway.wait_idle("echo")["instances"][0]  # nothing left in flight
    assert instance["consecutive_failures"] == 0
    assert not any(seen["method"] == "POST" and seen["body"] == b"x" * 10
                   for seen in upstream.seen)  # the short small body never went up


# -- 6. base-path escapes --------------------------------------------------------------------


def test_every_spelling_of_a_dot_segment_is_refused(gateway, upstream):
    gateway.register("api", upstream.address + "/v1/public")
    gateway.wait_routable("/api/x", bearer())
    upstream.seen.clear()
    headers = {"Host": "gw", "Authorization": f"Bearer {make_token()}"}
    for rest in ("..;/admin", "..%2Fadmin", "..%2fadmin", "%2e%2e%2fadmin", "..\\admin",
                 "%2e%2e%5cadmin", ".%2e/admin", "%2E%2e/admin", "./admin", "..", "x/..",
                 "x/..;jsessionid=1/admin", "%252e%252e/admin", "..%5c..%5cadmin"):
        answer = raw_request(gateway.port, f"GET /api/{rest}", headers)
        assert answer.status == 400, rest
        assert answer.json()["error"] == "bad_request"
    assert upstream.seen == []
    # Dots that are not dot segments are passed as sent.
    for rest in ("a..b", "...", ".well-known/x", "x.json", "%2Fa%2Fb"):
        assert raw_request(gateway.port, f"GET /api/{rest}", headers).status == 200, rest
        assert upstream.seen[-1]["path"] == f"/v1/public/{rest}"


# -- 7. a malformed X-Forwarded-For from a trusted proxy -----------------------------------


def test_a_malformed_forwarded_for_from_a_trusted_proxy_gives_no_admin_rights(
        start_gateway, upstream):
    gateway = start_gateway(GATEWAY_TRUSTED_PROXIES="127.0.0.1/32",
                            GATEWAY_ADMIN_ALLOW="127.0.0.1/32")
    gateway.register("echo", upstream.address)
    for chain in ("garbage", "1.2.3.4, garbage", "", "300.1.1.1"):
        answer = requests.get(f"{gateway.url}/_gateway/services", timeout=10,
                              headers={"X-Forwarded-For": chain})
        if chain == "":  # no chain: the proxy itself asks
            assert answer.status_code == 200
            continue
        assert answer.status_code == 400, chain
        assert answer.json()["error"] == "bad_request"
    # A well-formed chain names the client, who is not admin-allowed.
    answer = requests.get(f"{gateway.url}/_gateway/services", timeout=10,
                          headers={"X-Forwarded-For": "203.0.113.9"})
    assert answer.status_code == 401


# -- 8. token spraying -------------------------------------------------------------------------


def test_refused_tokens_from_one_address_are_answered_429_once_its_bucket_is_empty(
        start_gateway, upstream):
    gateway = start_gateway(GATEWAY_AUTH_FAILURE_LIMIT="1/minute, burst=5")
    gateway.register("echo", upstream.address)
    gateway.wait_routable("/echo/x", bearer())
    statuses = []
    with requests.Session() as session:
        for _ in range(12):
            answer = session.get(f"{gateway.url}/echo/x", timeout=10,
                                 headers={"Authorization": "Bearer not-a-token"})
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert int(answer.headers["Retry-After"]) >= 1
                assert answer.json()["error"] == "rate_limited"
                assert "WWW-Authenticate" not in answer.headers
    assert statuses.count(401) <= 6 and statuses[-1] == 429, statuses
    # A valid token from the same address is not held back by the sprayer's bucket.
    assert requests.get(f"{gateway.url}/echo/x", headers=bearer(), timeout=10).status_code == 200


def test_refused_tokens_drain_the_rate_limit_and_then_get_429(start_gateway, upstream):
    gateway = start_gateway(GATEWAY_RATE_LIMIT="3/minute", GATEWAY_AUTH_FAILURE_LIMIT="off",
                            GATEWAY_WORKERS=1)  # one worker: it knows the service once acknowledged
    gateway.register("echo", upstream.address)
    statuses = [requests.get(f"{gateway.url}/echo/x", timeout=10,
                             headers={"Authorization": "Bearer nope"}).status_code
                for _ in range(5)]
    assert statuses[:3] == [401, 401, 401] and statuses[3:] == [429, 429], statuses


# -- 9. input that used to produce a 500 ---------------------------------------------------


def test_malformed_chunked_bodies_get_400_json_and_never_reach_the_upstream(gateway, upstream):
    gateway.register("echo", upstream.address)
    gateway.wait_routable("/echo/x", bearer())
    upstream.seen.clear()
    head = (f"POST /echo/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {make_token()}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    for body in (b"-3\r\nabc\r\n0\r\n\r\n", b"0x3\r\nabc\r\n0\r\n\r\n",
                 b"+3\r\nabc\r\n0\r\n\r\n", b"3;\x01bad\r\nabc\r\n0\r\n\r\n",
                 b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n", b"3\r\nabcXX0\r\n\r\n",
                 b"zz\r\n", b"3\r\nab"):
        answer = send_raw(gateway.port, head + body)
        status, headers, payload = parse_response(answer)
        assert status == 400, (body, answer[:200])
        assert headers["content-type"] == "application/json"
        assert json.loads(payload)["error"] == "bad_request"
    # What reached the upstream (a body cut off mid-way) was never answered as complete.
    assert all(seen["body"] != b"abc" for seen in upstream.seen)
    instance = gateway.wait_idle("echo")["instances"][0]  # nothing left in flight
    assert instance["consecutive_failures"] == 0


# -- 11. looser ends ------------------------------------------------------------------------


def test_http11_without_host_is_refused(gateway):
    status, headers, body = parse_response(send_raw(
        gateway.port, b"GET /_gateway/health HTTP/1.1\r\n\r\n"))
    assert status == 400
    assert json.loads(body)["error"] == "bad_request"
    # HTTP/1.0 has no Host requirement.
    assert parse_response(send_raw(gateway.port, b"GET /_gateway/health HTTP/1.0\r\n\r\n"))[0] \
        == 200


def test_a_transfer_coding_other_than_chunked_is_refused(gateway, upstream):
    gateway.register("echo", upstream.address)
    gateway.wait_routable("/echo/x", bearer())
    upstream.seen.clear()
    for coding in ("gzip, chunked", "deflate, chunked", "br"):
        data = (f"POST /echo/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {make_token()}\r\n"
                f"Transfer-Encoding: {coding}\r\n\r\n3\r\nabc\r\n0\r\n\r\n").encode()
        status, headers, body = parse_response(send_raw(gateway.port, data))
        assert status == 501, coding
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"] == "not_implemented"
    assert upstream.seen == []


def test_requests_gunicorn_refuses_itself_get_the_json_error_shape(gateway):
    cases = [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: gw\r\n" + b"".join(
            b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"NOT A REQUEST LINE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n\r\n", 400),
    ]
    for data, expected in cases:
        answer = send_raw(gateway.port, data)
        status, headers, body = parse_response(answer)
        assert status == expected, answer[:200]
        assert headers["content-type"] == "application/json", answer[:200]
        doc = json.loads(body)
        assert set(doc) == {"error", "message", "request_id"}
        assert doc["error"] in ("bad_request",)
        assert b"<html" not in answer


def test_each_forwarded_request_carries_the_gateways_via_marker(gateway, upstream):
    gateway.register("echo", upstream.address)
    gateway.wait_routable("/echo/x", bearer())
    sent = requests.get(f"{gateway.url}/echo/x", timeout=10,
                        headers={**bearer(), "Via": "1.1 edge-proxy"}).json()["headers"]
    first, second = [entry.strip() for entry in sent["Via"].split(",")]
    assert first == "1.1 edge-proxy"
    assert second.startswith("1.1 gateway-")
    # Every worker of one gateway shares the marker.
    markers = {requests.get(f"{gateway.url}/echo/x", headers={**bearer(), "Connection": "close"},
                            timeout=10).json()["headers"]["Via"] for _ in range(8)}
    assert len(markers) == 1


def test_registry_bodies_that_used_to_500_are_refused_and_change_nothing(gateway, upstream):
    gateway.register("echo", upstream.address)
    before = gateway.services()
    bodies = [
        "[" * 60_000,
        '{"name": ' + "[" * 30_000 + "]" * 30_000 + "}",
        '{"name": "a", "address": "http://127.0.0.1:1", "metadata": {"k": "\\ud800"}}',
        '{"name": "a", "address": "http://127.0.0.1:1", "ttl": NaN}',
        '{"name": "a", "address": "http://127.0.0.1:1", "weight": 1e400}',
    ]
    for body in bodies:
        for path in ("/register_service", "/deregister_service"):
            answer = requests.post(gateway.url + path, data=body, timeout=10,
                                   headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, (path, body[:60], answer.text[:200])
            assert answer.json()["error"] == "bad_request"
    assert gateway.services() == before


def test_a_policy_number_out_of_bounds_is_refused_and_the_service_keeps_working(
        gateway, upstream):
    gateway.register("echo", upstream.address)
    gateway.wait_routable("/echo/x", bearer())
    for policy in ({"rate_limit": "9" * 400 + "/second"}, {"connect_timeout": 10**400},
                   {"response_json": {"add": {"x": [[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}}}):
        answer = requests.put(f"{gateway.url}/_gateway/services/echo/policy", timeout=10,
                              data=json.dumps(policy), headers={"Content-Type":
                                                                "application/json"})
        assert answer.status_code == 400, policy
    assert requests.get(f"{gateway.url}/_gateway/services/echo/policy",
                        timeout=10).status_code == 404
    assert requests.get(f"{gateway.url}/echo/x", headers=bearer(), timeout=10).status_code == 200


def test_a_token_whose_exp_is_absurd_is_refused(gateway, upstream):
    gateway.register("echo", upstream.address)
    gateway.wait_routable("/echo/x", bearer())
    for exp in (1e308, 10**30, True):
        answer = requests.get(f"{gateway.url}/echo/x", timeout=10,
                              headers={"Authorization": f"Bearer {make_token(exp=exp)}"})
        assert answer.status_code == 401, exp
        assert answer.json()["error"] == "unauthorized"
