#!/usr/bin/env python3
"""The seed's client: mint an HS256 JWT and call a service through the gateway twice.

First with the bare token in ``Authorization`` (no "Bearer"), then without it. Prints the
status and body of each call; exits 0 if they were 200 and 401, else 1.

``--print-token`` only prints a fresh token (the demo uses it for its own curl calls).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jwt
import requests

SEED_SECRET = "secret_key"  # the seed's demo secret; set GATEWAY_JWT_SECRET for anything real
TIMEOUT_S = 5


def mint_token(
    secret: str | None = None,
    issuer: str | None = None,
    sub: str = "1234567890",
    ttl_s: int = 3600,
) -> str:
    """The seed's token: HS256 with claims sub, iss and exp (now + ttl_s)."""
    secret = secret if secret is not None else os.environ.get("GATEWAY_JWT_SECRET", SEED_SECRET)
    issuer = issuer if issuer is not None else os.environ.get("GATEWAY_JWT_ISSUER", "my_issuer")
    claims = {"sub": sub, "iss": issuer, "exp": int(time.time()) + ttl_s}
    with warnings.catch_warnings():
        if secret == SEED_SECRET:  # known to be short (10 bytes); PyJWT would warn every time
            warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm="HS256")


def call(url: str, token: str | None) -> int:
    headers = {"Authorization": token} if token else {}
    response = requests.get(url, headers=headers, timeout=TIMEOUT_S)
    print(f"Response: {response.status_code}")
    print(f"Response Body: {response.text.rstrip()}")
    return response.status_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gateway",
        default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
        help="gateway base URL (env GATEWAY_URL; default %(default)s)",
    )
    parser.add_argument("--service", default="hello_service", help="service (%(default)s)")
    parser.add_argument("--print-token", action="store_true", help="print a token and exit")
    args = parser.parse_args()

    token = mint_token()
    if args.print_token:
        print(token)
        return 0

    url = f"{args.gateway.rstrip('/')}/{args.service}"
    print(f"Token: {token}")
    try:
        print(f"GET {url} with the token:")
        with_token = call(url, token)
        print(f"GET {url} without a token:")
        without_token = call(url, None)
    except requests.RequestException as err:
        print(f"Request to {url} failed: {err}", file=sys.stderr)
        return 1

    if with_token == 200 and without_token == 401:
        return 0
    print(
        f"Unexpected: wanted 200 with the token and 401 without, got {with_token} and "
        f"{without_token}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
