"""Names and addresses a caller may register (README: The registry)."""

import pytest

from gateway_app.errors import BadRequest
from gateway_app.validation import (
    check_json_value,
    check_metadata,
    check_name,
    check_ttl,
    check_weight,
    has_dot_segment,
    instance_id,
    normalise_address,
    parse_json,
)


@pytest.mark.parametrize("name", ["hello_service", "a", "A1.b-c_d", "x" * 64, "9lives"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "_gateway", "register_service", "deregister_service",
                                  "-x", ".x", "x" * 65, "a b", "a/b", "ü", None, 3])
def test_invalid_names(name):
    with pytest.raises(BadRequest):
        check_name(name)


@pytest.mark.parametrize("given, expected", [
    ("http://localhost:9090", "http://localhost:9090"),
    ("HTTP://Example.COM:80/api/", "http://example.com/api"),
    ("https://example.com:443", "https://example.com"),
    ("https://example.com:8443/", "https://example.com:8443"),
    ("http://10.1.2.3:8080/v1/x", "http://10.1.2.3:8080/v1/x"),
    ("http://[::1]:9000", "http://[::1]:9000"),
    ("http://127.0.0.1:9090/a%2Fb", "http://127.0.0.1:9090/a%2Fb"),
])
def test_addresses_are_normalised(given, expected):
    assert normalise_address(given) == expected


@pytest.mark.parametrize("address", [
    "", "localhost:9090", "ftp://example.com", "http://", "http://user:pw@example.com",
    "http://example.com?x=1", "http://example.com/#frag", "http://example.com:0",
    "http://example.com:65536", "http://example.com:abc", "http://169.254.169.254",
    "http://169.254.169.254/latest/meta-data", "http://[fe80::1]:80", "http://0.0.0.0:80",
    "http://[::]:80", "http://2852039166", "http://0251.0376.0251.0376", "http://0xa9fea9fe",
    "http://[::ffff:169.254.169.254]", "http://metadata.google.internal",
    "http://exa mple.com", "http://example.com/a/../b", "http://example.com/%2e%2e/x",
    "http://example.com:", 42, None,
])
def test_bad_addresses_are_refused(address):
    with pytest.raises(BadRequest):
        normalise_address(address)


def test_instance_id_is_stable_and_depends_on_the_normalised_address():
    a = instance_id(normalise_address("HTTP://Example.com:80/"))
    assert a == instance_id(normalise_address("http://example.com"))
    assert a != instance_id(normalise_address("http://example.com:8080"))


@pytest.mark.parametrize("path, expected", [
    ("/a/b", False), ("/a/..b", False), ("/a/.well-known", False), ("/a/..", True),
    ("/a/./b", True), ("/a/%2e%2E/b", True), ("/a/.%2e", True), ("/..", True), ("/a/%2e", True),
])
def test_dot_segments(path, expected):
    assert has_dot_segment(path) is expected


def test_ttl_weight_metadata_rules():
    assert check_ttl(None) is None
    assert check_ttl(30) == 30.0
    for bad in (True, 0, 86401, "30", float("nan"), float("inf"), 10**400):
        with pytest.raises(BadRequest):
            check_ttl(bad)
    assert check_weight(None) == 1
    for bad in (0, 1001, 1.5, True, "2"):
        with pytest.raises(BadRequest):
            check_weight(bad)
    assert check_metadata({"zone": "a"}) == {"zone": "a"}
    for bad in ([], {"a": 1}, {"a": "x" * 5000}, {"a": "\ud800"}):
        with pytest.raises(BadRequest):
            check_metadata(bad)


@pytest.mark.parametrize("text", [
    "[" * 60000, "[" * 33 + "]" * 33, '{"a": ' * 33 + "1" + "}" * 33,
    "NaN", "[Infinity]", '{"a": -Infinity}', "1e400", "-1e400", str(2**53), str(-(2**53)),
    "9" * 5000, '"\\ud800"', '{"\\udfff": 1}', '["ok", "\\udc00x"]', "{", "",
])
def test_parse_json_refuses_what_the_gateway_cannot_hold(text):
    with pytest.raises(BadRequest):
        parse_json(text)


def test_parse_json_accepts_plain_json_within_bounds():
    deep = "[" * 32 + "]" * 32
    assert parse_json(deep) is not None
    doc = parse_json('{"a": [1, 2.5, -0.0, null, true, "\\u00e9\\ud83d\\ude00"], "b": 1e300}')
    assert doc == {"a": [1, 2.5, -0.0, None, True, "é\U0001F600"], "b": 1e300}
    assert parse_json(str(2**53 - 1)) == 2**53 - 1


def test_check_json_value_bounds_values_built_in_python():
    check_json_value({"a": [1, "x", None]}, "v", max_depth=2)
    for bad, depth in (({"a": [[]]}, 2), ({"a": float("nan")}, 8), ({"a": "\ud800"}, 8),
                       ({"a": 2**60}, 8), ({"a": {1, 2}}, 8)):
        with pytest.raises(BadRequest):
            check_json_value(bad, "v", max_depth=depth)


@pytest.mark.parametrize("address", [
    "http://100.100.100.200", "http://192.0.0.192/latest", "http://168.63.129.16",
    "http://[fd00:ec2::254]", "http://[64:ff9b::a9fe:a9fe]", "http://224.0.0.1",
    "http://255.255.255.255", "http://[ff02::1]", "http://0.1.2.3:80",
])
def test_every_refused_range_is_refused_at_registration_too(address):
    with pytest.raises(BadRequest, match="is refused"):
        normalise_address(address)


def test_the_deny_setting_applies_to_literals_at_registration():
    import ipaddress

    deny = [ipaddress.ip_network("10.0.0.0/8")]
    with pytest.raises(BadRequest, match="GATEWAY_UPSTREAM_DENY"):
        normalise_address("http://10.1.2.3:8080", deny)
    assert normalise_address("http://10.1.2.3:8080") == "http://10.1.2.3:8080"
    assert normalise_address("http://internal.example", deny) == "http://internal.example"
