"""Generated bodies for the registry and policy API (issue 10): never a 500, every error in the
gateway's JSON shape, and nothing changed by a refused write.

Hypothesis generates the bodies from a fixed seed (``derandomize``) within a fixed budget, so
a run is reproducible (about 15 s on a 2-core machine). The bodies mix the seed's
``name,address`` text, JSON objects of arbitrary values (nesting on both sides of
MAX_JSON_DEPTH, unicode, lone surrogates, NaN and infinities, integers of hundreds of digits)
and hand-made hostile texts. Run against the code before issue 10, it finds the RecursionError,
the lone surrogate in metadata, the huge connect_timeout and the rate limit that overflows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_app.settings import STRATEGIES
from tests.conftest import make_token

#: A failing example may hold a 60 KB body: its report must not fail on its own size.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

UPSTREAM = "http://upstream.test:9000"
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NAMES = ["svc", "api", "a.b-c_d", "x" * 64, "x" * 65, "_gateway", "register_service", "-bad",
         "b ad", "\u00e9", ""]
ADDRESSES = [UPSTREAM, "http://127.0.0.1:9000", "http://localhost:9090/v1", "https://example.com",
             "HTTP://Example.COM:80/api/", "http://[::1]:1", "http://169.254.169.254",
             "ftp://x", "http://a:0", "http://a:65536", "http://0.0.0.0", "http://x?q=1",
             "http://\u00e9.com", "http://a/../b", ""]
LONE_SURROGATES = ["\ud800", "x\udfff", "\udbff", "ok\ud83d", "\udc00\ud800"]

strings = (st.text(max_size=24) | st.sampled_from(LONE_SURROGATES + NAMES + ADDRESSES)
           | st.text(st.characters(codec="ascii"), max_size=8))
numbers = (st.integers(-(10**6), 10**6) | st.floats()
           | st.sampled_from([2**53 - 1, 2**53, -(2**53), 10**400, -(10**80), 1e308, 5e-324, -0.0])
           | st.integers(min_value=-(10**400), max_value=10**400))
scalars = st.none() | st.booleans() | numbers | strings
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
    max_leaves=10,
)


def _nest(leaf: Any, depth: int, in_list: bool) -> Any:
    for _ in range(depth):
        leaf = [leaf] if in_list else {"k": leaf}
    return leaf


#: Values nested on both sides of the parser's depth bound (and the policy's json_add one).
deep_values = st.builds(_nest, scalars, st.integers(0, 70), st.booleans())
values = json_values | deep_values

#: Hand-made texts no generator is likely to stumble upon.
HOSTILE = [
    "[" * 60000, '{"name": ' + "[" * 60000, "{" * 40, "[" * 33 + "]" * 33, "NaN", "Infinity",
    '{"name": NaN}', '{"name": "svc", "address": "http://127.0.0.1:9000", "ttl": -Infinity}',
    '{"name": "svc", "address": "http://127.0.0.1:9000", "metadata": {"k": "\\ud800"}}',
    '{"name": "svc", "address": "http://127.0.0.1:9000", "weight": ' + "9" * 5000 + "}",
    '{"name": "svc", "address": "http://127.0.0.1:9000"}x', "", "   \n", "{", "svc,",
    ",http://127.0.0.1:9000", "x" * 70000,
]

VALID_NAMES = NAMES[:4]
VALID_ADDRESSES = ADDRESSES[:5]


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any] = values,
           ) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, else ``hostile``: a body gets past its first fields often
    enough for the checks of the later ones to be reached. (Not ``valid | hostile``: ``|``
    flattens a ``hostile`` that is itself a choice, and weighs each of its branches alike.)"""
    return st.integers(0, 3).flatmap(lambda i: valid if i else hostile)


# ttl: valid ones all long (a short lease lapsing mid-test would change the listing by itself).
ttls = mostly(st.none() | st.integers(3600, 86400), st.sampled_from(
    [0, -1, 0.5, 86401, True, "30", float("nan"), float("inf"), 10**400, [], {}]))
registrations = st.fixed_dictionaries({
    "name": mostly(st.sampled_from(VALID_NAMES), st.sampled_from(NAMES) | values),
    "address": mostly(st.sampled_from(VALID_ADDRESSES), st.sampled_from(ADDRESSES) | values),
}, optional={
    "ttl": ttls,
    "weight": mostly(st.integers(1, 1000), st.integers(-5, 1005) | values),
    "metadata": mostly(st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=4),
                       st.dictionaries(strings, strings, max_size=4) | values),
    "extra": values,
})


def _text_body(name: str, address: str, separator: str) -> str:
    return f"{name}{separator}{address}"


text_bodies = st.builds(
    _text_body, st.sampled_from(NAMES) | st.text(max_size=12),
    st.sampled_from(ADDRESSES) | st.text(max_size=24), st.sampled_from([",", " , ", ",\n", ""]))


def _dumps(doc: Any) -> str:
    return json.dumps(doc)  # NaN/Infinity as Python writes them; surrogates as \udXXX escapes


registration_bodies = (registrations.map(_dumps) | text_bodies | st.sampled_from(HOSTILE)
                       | st.binary(max_size=64))
content_types = st.sampled_from(["application/json", "text/plain",
                                 "application/json; charset=utf-8", None])

header_names = st.sampled_from(["X-A", "X-Custom-Header", "X-Trace", "Server"])
header_maps = mostly(
    st.fixed_dictionaries({}, optional={
        "add": st.dictionaries(header_names, st.text(st.characters(codec="latin-1",
                                                                   min_codepoint=32),
                                                     max_size=16), max_size=3),
        "remove": st.lists(header_names, max_size=3),
    }),
    st.fixed_dictionaries({}, optional={
        "add": st.dictionaries(st.sampled_from(["Host", "X-Request-ID", "bad name"]) | strings,
                               strings | values, max_size=3) | values,
        "remove": st.lists(strings, max_size=3) | values,
    }) | values,
)
rate_limits = mostly(
    st.from_regex(r"\A[1-9][0-9]{0,5}/(second|minute|hour)(, burst=[1-9][0-9]{0,5})?\Z")
    | st.sampled_from(["off", None]),
    st.from_regex(r"\A[0-9]{1,12}/(second|minute|hour)(, burst=[0-9]{1,12})?\Z")
    | st.builds("{}/{}".format, st.integers(1, 5000).map(lambda n: "9" * n),
                st.sampled_from(["second", "minute", "hour"]))
    | values,
)
json_adds = mostly(
    st.dictionaries(st.text(max_size=8), st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=8)
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                    max_size=3),
        max_leaves=6), max_size=3),
    st.dictionaries(strings, values, max_size=4) | values,
)
policies = st.fixed_dictionaries({}, optional={
    "strip_prefix": mostly(st.booleans()),
    "connect_timeout": mostly(st.none() | st.floats(0.01, 600), numbers | values),
    "read_timeout": mostly(st.none() | st.integers(1, 3600), numbers | values),
    "rate_limit": rate_limits,
    "auth": mostly(st.sampled_from(["jwt", "none"])),
    "request_headers": header_maps,
    "response_headers": header_maps,
    "response_json": mostly(st.fixed_dictionaries({}, optional={"add": json_adds})),
    "balancing": mostly(st.sampled_from(STRATEGIES)),
    "health_check": mostly(st.fixed_dictionaries({}, optional={
        "path": mostly(st.sampled_from(["/", "/health"]), st.sampled_from(["x", "/../a"])
                       | strings),
        "interval": mostly(st.floats(5, 3600), numbers), "timeout": mostly(st.floats(0.05, 4)),
        "healthy_threshold": mostly(st.integers(1, 100), numbers),
        "unhealthy_threshold": mostly(st.integers(1, 100), numbers),
    })),
})
policy_bodies = (policies.map(_dumps) | policies.map(_dumps)
                 | st.dictionaries(strings, values, max_size=3).map(_dumps)
                 | st.sampled_from(HOSTILE))
policy_names = mostly(st.sampled_from(["svc", "svc", "api"]),
                      st.sampled_from(["_gateway", "x" * 65, "b ad", "\u00e9", "a/b", ".."]))


@pytest.fixture
def gateway(make_app, upstream):
    """A gateway with one instance of ``svc`` on a mocked upstream answering JSON objects."""
    app = make_app()
    client = app.test_client()
    upstream.add(responses.GET, re.compile(re.escape(UPSTREAM) + r"/.*"), json={"ok": True})
    assert client.post("/register_service", data=f"svc,{UPSTREAM}").status_code == 201
    return app, client


#: What a write may change of an instance; its health and load are the traffic's doing.
REGISTERED = ("id", "address", "weight", "metadata", "ttl", "registered_at", "expires_at")


def _state(app, client) -> tuple[Any, dict[str, Any]]:
    """The listing, as registered, and the stored policies."""
    listing = [(service["name"], [{k: instance[k] for k in REGISTERED}
                                  for instance in service["instances"]])
               for service in client.get("/_gateway/services").get_json()["services"]]
    return listing, dict(app.extensions["gateway"].registry.current().policy_docs)


def _check_answer(response, proxied: bool = False) -> None:
    assert response.status_code != 500
    if proxied and response.status_code < 400:
        return  # the upstream's answer, with the policy's response headers
    assert response.is_json, response.data[:200]
    if response.status_code >= 400:
        body = response.get_json()
        assert set(body) == {"error", "message", "request_id"}, body
        assert isinstance(body["error"], str) and isinstance(body["message"], str)
        assert body["request_id"] == response.headers["X-Request-ID"]


class Watch:
    """Sends writes; after each, the registry's state must equal the one seen before it,
    unless the write was accepted (nothing else changes the listing or policies meanwhile)."""

    def __init__(self, app, client) -> None:
        self.app, self.client = app, client
        self.state = _state(app, client)

    def write(self, send: Callable[[], Any]) -> Any:
        response = send()
        _check_answer(response)
        after = _state(self.app, self.client)
        if response.status_code >= 400:
            assert after == self.state, response.get_json()
        self.state = after
        return response


def test_generated_registrations(gateway):
    app, client = gateway
    watch = Watch(app, client)

    @settings(FUZZ, max_examples=2000)
    @given(path=st.sampled_from(["/register_service", "/register_service",
                                 "/deregister_service"]),
           body=registration_bodies, content_type=content_types)
    def check(path, body, content_type):
        watch.write(lambda: client.post(path, data=body, content_type=content_type))

    check()


def test_generated_policies(gateway):
    app, client = gateway
    auth = {"Authorization": f"Bearer {make_token()}"}
    watch = Watch(app, client)

    @settings(FUZZ, max_examples=1500)
    @given(name=policy_names, body=policy_bodies, content_type=content_types)
    def check(name, body, content_type):
        response = watch.write(lambda: client.put(
            f"/_gateway/services/{quote(name, safe='')}/policy", data=body,
            content_type=content_type))
        if response.status_code < 300 and name == "svc":
            # An accepted policy must also serve: no 500 on the service's next request.
            with client.get("/svc/x", headers=auth) as proxied:
                _check_answer(proxied, proxied=True)

    check()
