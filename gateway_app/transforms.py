"""Transformations a service's policy asks for: headers both ways, fields added to JSON bodies.

Only JSON responses within :data:`~gateway_app.policies.MAX_JSON_TRANSFORM_BYTES` are read
whole; everything else stays streamed and untouched. A body that is not a JSON object, or that
this interpreter cannot parse or write back (nesting past its recursion limit, a lone surrogate
such as ``"\\ud800"``), passes through as it came.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

from .forwarding import read_upto, stream_body
from .policies import MAX_JSON_TRANSFORM_BYTES, Policy


def apply_request_headers(headers: dict[str, str], policy: Policy) -> None:
    """Remove, then add, the request headers the policy names (owned ones are refused at PUT)."""
    if policy.request_remove:
        for name in [h for h in headers if h.lower() in policy.request_remove]:
            del headers[name]
    for name, value in policy.request_add:
        for existing in [h for h in headers if h.lower() == name.lower()]:
            del headers[existing]
        headers[name] = value


def response_headers(headers: list[tuple[str, str]], policy: Policy) -> list[tuple[str, str]]:
    """The upstream's response headers with the policy's removals and additions."""
    replaced = policy.response_remove | {name.lower() for name, _ in policy.response_add}
    kept = [(k, v) for k, v in headers if k.lower() not in replaced]
    kept.extend(policy.response_add)
    return kept


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and
                                          mime.endswith("+json"))


def json_body(upstream: Any, headers: list[tuple[str, str]], policy: Policy,
              method: str) -> Iterable[bytes] | None:
    """The body with the policy's fields added, when it is a small JSON object; else ``None``
    (the caller streams the upstream's body untouched). ``headers`` is updated in place.

    A HEAD answer that GET would transform loses its Content-Length: the upstream's is the
    untransformed length, and the transformed one is not known without the body (RFC 9110
    section 8.6 lets a HEAD answer leave it out, never state another length)."""
    status = upstream.status_code
    if status < 200 or status in (204, 304):
        return None
    lowered = {k.lower(): v for k, v in headers}
    if not _is_json(lowered.get("content-type")):
        return None
    if lowered.get("content-encoding", "identity").lower() != "identity":
        return None  # compressed: passed through untouched, never decompressed
    declared = lowered.get("content-length")
    if declared is not None and (not declared.isdigit()
                                 or int(declared) > MAX_JSON_TRANSFORM_BYTES):
        return None
    if method == "HEAD":
        headers[:] = [(k, v) for k, v in headers if k.lower() != "content-length"]
        return None
    data = read_upto(upstream, MAX_JSON_TRANSFORM_BYTES + 1)
    if len(data) > MAX_JSON_TRANSFORM_BYTES:  # chunked and larger than the bound: stream on
        return _chain(data, stream_body(upstream))
    try:
        doc = json.loads(data)
        if isinstance(doc, dict):
            doc.update(policy.json_add)
            data = json.dumps(doc, ensure_ascii=False).encode()
    except (ValueError, RecursionError):
        pass  # not JSON, nested too deep to parse, or holding a lone surrogate: as it came
    headers[:] = [(k, v) for k, v in headers if k.lower() != "content-length"]
    headers.append(("Content-Length", str(len(data))))
    return [data]


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    return itertools.chain((first,), rest)
