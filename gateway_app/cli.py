"""The ``gateway`` command: mint tokens and talk to a running gateway's registry.

    gateway token --sub ID [--ttl SECONDS] [--claim k=v ...]
    gateway token --register NAME[,NAME...] [--ttl SECONDS] [--sub ID]
    gateway register NAME ADDRESS [--ttl SECONDS] [--weight N]
    gateway deregister NAME [ADDRESS]
    gateway services [--json]
    gateway revoke ID

``token`` reads the same ``GATEWAY_*`` variables as the gateway (secret, algorithms, issuer,
audience; the registration key for ``--register``), so what it prints verifies. The others
send HTTP to ``--url`` (default ``http://127.0.0.1:8080``) with ``GATEWAY_ADMIN_TOKEN`` as a
bearer token when it is set (else ``GATEWAY_REGISTRATION_TOKEN``, for register, deregister
and services).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import requests

from .config import ConfigError, load_settings, read_or_create_registration_key
from .errors import BadRequest

DEFAULT_URL = "http://127.0.0.1:8080"
RESERVED_CLAIMS = frozenset({"exp", "iat", "nbf", "sub", "iss", "aud"})


class CommandError(Exception):
    """Shown to the user as one line on stderr, with exit status 1."""


def _claim(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected k=v, got {text!r}")
    if key in RESERVED_CLAIMS:
        raise argparse.ArgumentTypeError(f"{key!r} is set by the command itself")
    return key, value


def cmd_token(args: argparse.Namespace) -> None:
    from . import build_verifier

    settings = load_settings()
    if args.register is not None:
        from .credentials import RegistrationCredentials

        if args.claim:
            raise CommandError("--claim does not go with --register")
        credentials = RegistrationCredentials(read_or_create_registration_key(settings))
        try:
            token, _ = credentials.mint(args.register.split(","), args.ttl, args.sub)
        except BadRequest as exc:
            raise CommandError(exc.description or "bad arguments") from None
        print(token)
        return
    if args.sub is None:
        raise CommandError("token needs --sub ID (or --register NAME for a registration "
                           "credential)")
    private_key = None
    if settings.jwt_private_key_file is not None:
        private_key = settings.jwt_private_key_file.read_bytes()
    verifier = build_verifier(settings, with_provider=False)
    try:
        token = verifier.mint(private_key, args.sub, 3600 if args.ttl is None else args.ttl,
                              dict(args.claim))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(token)


def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    headers = kwargs.pop("headers", {})
    credential = os.environ.get("GATEWAY_ADMIN_TOKEN") \
        or os.environ.get("GATEWAY_REGISTRATION_TOKEN")
    if credential:
        headers["Authorization"] = f"Bearer {credential.strip()}"
    url = args.url.rstrip("/") + path
    try:
        response = requests.request(method, url, headers=headers, timeout=10, **kwargs)
    except requests.RequestException as exc:
        raise CommandError(f"cannot reach the gateway at {args.url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {"error": "unexpected_response", "message": response.text[:200]}
    if response.status_code >= 400:
        raise CommandError(f"{response.status_code} {body.get('error')}: {body.get('message')}")
    return body


def cmd_register(args: argparse.Namespace) -> None:
    doc: dict[str, Any] = {"name": args.name, "address": args.address}
    if args.ttl is not None:
        doc["ttl"] = args.ttl
    if args.weight is not None:
        doc["weight"] = args.weight
    body = _call(args, "POST", "/register_service", json=doc)
    inst = body["instance"]
    print(f"registered {body['name']} instance {inst['id']} at {inst['address']}")


def cmd_deregister(args: argparse.Namespace) -> None:
    doc = {"name": args.name}
    if args.address:
        doc["address"] = args.address
    body = _call(args, "POST", "/deregister_service", json=doc)
    for inst in body["removed"]:
        print(f"deregistered {body['name']} instance {inst['id']} at {inst['address']}")


def cmd_services(args: argparse.Namespace) -> None:
    services: list[dict[str, Any]] = []
    cursor = None
    while True:  # every page of the listing
        params = {"limit": 1000, **({"after": cursor} if cursor else {})}
        body = _call(args, "GET", "/_gateway/services", params=params)
        services += body["services"]
        cursor = body.get("next")
        if not cursor:
            break
    if args.json:
        print(json.dumps({"services": services}, indent=2))
        return
    if not services:
        print("no services registered")
    for service in services:
        print(service["name"])
        for inst in service["instances"]:
            lease = f"expires {inst['expires_at']}" if inst["expires_at"] else "no lease"
            print(f"  {inst['id']}  {inst['address']}  weight={inst['weight']}  {inst['health']}"
                  f"  {lease}")


def cmd_revoke(args: argparse.Namespace) -> None:
    body = _call(args, "DELETE", f"/_gateway/registration-tokens/{args.id}")
    print(f"revoked registration credential {body['id']} (kept until {body['until']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    token = sub.add_parser("token", help="print a token the gateway accepts, or a registration "
                                         "credential (--register)")
    token.add_argument("--sub", help="the subject (who the token is for)")
    token.add_argument("--register", metavar="NAME[,NAME...]",
                       help="print a registration credential for these services instead: it "
                            "may register, renew, drain and remove their instances only")
    token.add_argument("--ttl", type=int, default=None,
                       help="seconds until it expires (3600 for a token, 30 days for a "
                            "registration credential)")
    token.add_argument("--claim", type=_claim, action="append", default=[], metavar="K=V",
                       help="an extra string claim (repeatable)")
    token.set_defaults(func=cmd_token)

    def remote(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--url", default=os.environ.get("GATEWAY_URL", DEFAULT_URL),
                       help=f"the gateway (default {DEFAULT_URL})")
        return p

    register = remote("register", "register an instance of a service")
    register.add_argument("name")
    register.add_argument("address")
    register.add_argument("--ttl", type=float, help="lease in seconds (renew before it lapses)")
    register.add_argument("--weight", type=int)
    register.set_defaults(func=cmd_register)

    deregister = remote("deregister", "remove a service, or one instance of it")
    deregister.add_argument("name")
    deregister.add_argument("address", nargs="?")
    deregister.set_defaults(func=cmd_deregister)

    services = remote("services", "list services and their instances")
    services.add_argument("--json", action="store_true", help="print the raw JSON")
    services.set_defaults(func=cmd_services)

    revoke = remote("revoke", "revoke a registration credential by its id (every worker and "
                              "node within a second)")
    revoke.add_argument("id", help="the credential's id (its jti: 32 hex digits)")
    revoke.set_defaults(func=cmd_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, ConfigError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
