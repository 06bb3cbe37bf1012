"""The ``gateway`` command: mint tokens and talk to a running gateway's registry.

    gateway token --sub ID [--ttl SECONDS] [--claim k=v ...]
    gateway token --register NAME[,NAME...] [--ttl SECONDS] [--sub ID]
    gateway register NAME ADDRESS [--ttl SECONDS] [--weight N]
    gateway deregister NAME [ADDRESS]
    gateway services [--json]
    gateway status [SERVICE ...] [--events N] [--json]
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
import time
from datetime import datetime
from typing import Any
from urllib.parse import quote

import requests

from .config import ConfigError, load_settings, read_or_create_registration_key
from .errors import BadRequest
from .health import EJECT_AFTER

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


def _event_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= 50:
        raise argparse.ArgumentTypeError("must be from 0 to 50")
    return value


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
    status, body = _request(args, method, path, **kwargs)
    if status >= 400:
        raise CommandError(f"{status} {body.get('error')}: {body.get('message')}")
    return body


def _request(args: argparse.Namespace, method: str, path: str,
             **kwargs: Any) -> tuple[int, Any]:
    """The gateway's status and JSON answer (an error's, too)."""
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
    if not isinstance(body, dict):
        body = {"error": "unexpected_response", "message": str(body)[:200]}
    return response.status_code, body


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


def _all_services(args: argparse.Namespace) -> list[dict[str, Any]]:
    services: list[dict[str, Any]] = []
    cursor = None
    while True:  # every page of the listing
        params = {"limit": 1000, **({"after": cursor} if cursor else {})}
        body = _call(args, "GET", "/_gateway/services", params=params)
        services += body["services"]
        cursor = body.get("next")
        if not cursor:
            return services


def cmd_services(args: argparse.Namespace) -> None:
    services = _all_services(args)
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


#: Instances whose events ``gateway status`` reads, at most (one request each).
MAX_STATUS_EVENT_READS = 500
#: Characters of a cause shown in the table (the JSON output has them whole).
MAX_CAUSE = 120


def instance_state(inst: dict[str, Any]) -> str:
    """healthy, ejected, draining, unhealthy or unknown: the listing's ``state`` where the
    gateway gives one, else read from its other health fields."""
    state = inst.get("state")
    if isinstance(state, str) and state:
        return state
    if inst.get("health") == "draining":
        return "draining"
    if inst.get("ejected_until"):
        return "ejected"
    return str(inst.get("health") or "unknown")


def instance_cause(inst: dict[str, Any], events: list[dict[str, Any]] | None) -> str:
    """Why the instance is in its state: its last cause, its newest event, its failing
    probe, or the passive-health rule that ejected it (as the dashboard says it)."""
    for key in ("last_cause", "cause"):
        value = inst.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and isinstance(value.get("cause"), str):
            return value["cause"]
    if events:
        return str(events[-1].get("cause") or "")
    check = inst.get("last_check")
    if isinstance(check, dict) and check.get("ok") is False:
        what = f"HTTP {check['status']}" if "status" in check else check.get("error", "failed")
        return f"probe: {what}"
    if instance_state(inst) == "ejected":
        return f"ejected after {EJECT_AFTER} failures in a row"
    failures = inst.get("consecutive_failures")
    return f"{failures} failures in a row" if failures else ""


def _printable(value: Any, limit: int = 200) -> str:
    """One line of plain text: what the gateway sent cannot move the terminal's cursor."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _remaining(when: Any, now: float) -> str:
    """``4m59s`` until an RFC 3339 time, like kubectl's ages; ``-`` when none."""
    if not when:
        return "-"
    try:
        seconds = datetime.fromisoformat(str(when)).timestamp() - now
    except ValueError:
        return _printable(when, 40)
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def _event_time(value: Any) -> str:
    try:
        return datetime.fromtimestamp(float(value)).astimezone().strftime("%H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return _printable(value, 30)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Columns as ``kubectl get`` prints them: upper-case heads, three spaces between, the
    last one unpadded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)


def _read_events(args: argparse.Namespace, services: list[dict[str, Any]]
                 ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Each instance's timeline, where the gateway keeps them: one request per instance,
    and none once the gateway shows it has no such endpoint (or refuses it)."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    reads = 0
    for service in services:
        for inst in service["instances"]:
            if reads >= MAX_STATUS_EVENT_READS:
                return found
            reads += 1
            path = (f"/_gateway/services/{quote(service['name'], safe='')}/instances/"
                    f"{quote(inst['id'], safe='')}/events")
            status, body = _request(args, "GET", path)
            if status == 200 and isinstance(body.get("events"), list):
                found[(service["name"], inst["id"])] = body["events"]
            elif status in (401, 403, 404, 405) and body.get("error") in (
                    "not_found", "method_not_allowed", "forbidden", "unauthorized"):
                return found  # no events API here, or not for this credential
    return found


def cmd_status(args: argparse.Namespace) -> None:
    services = _all_services(args)
    if args.service:
        known = {s["name"] for s in services}
        missing = [name for name in args.service if name not in known]
        if missing:
            raise CommandError(f"no service named {missing[0]!r}")
        services = [s for s in services if s["name"] in args.service]
    events = _read_events(args, services) if args.events else {}
    if args.json:
        for service in services:
            for inst in service["instances"]:
                key = (service["name"], inst["id"])
                inst["state"] = instance_state(inst)
                inst["cause"] = instance_cause(inst, events.get(key))
                if key in events:
                    inst["events"] = events[key][-args.events:]
        print(json.dumps({"services": services}, indent=2))
        return
    if not services:
        print("no services registered")
        return
    now = time.time()
    rows = []
    for service in services:
        if not service["instances"]:
            rows.append([_printable(service["name"]), "-", "-", "-", "-", "-", "-", "-"])
        for inst in service["instances"]:
            cause = instance_cause(inst, events.get((service["name"], inst["id"])))
            rows.append([
                _printable(service["name"]), _printable(inst["id"]),
                _printable(inst["address"]), instance_state(inst),
                _printable(inst.get("consecutive_failures", "-")),
                _printable(inst.get("in_flight", "-")),
                _remaining(inst.get("ejected_until"), now),
                _printable(cause, MAX_CAUSE) or "-",
            ])
    print(_table(["SERVICE", "INSTANCE", "ADDRESS", "STATE", "FAILURES", "IN-FLIGHT",
                  "EJECTED-FOR", "CAUSE"], rows))
    recent = []
    for (name, instance), timeline in events.items():
        for event in timeline[-args.events:]:
            where = _printable(event.get("node", "-"), 40)
            if event.get("worker") is not None:
                where += f"/{_printable(event['worker'], 12)}"
            recent.append((float(event.get("time") or 0), [
                _event_time(event.get("time")), _printable(name), _printable(instance), where,
                _printable(event.get("cause", ""), MAX_CAUSE)]))
    if recent:
        recent.sort(key=lambda item: item[0])  # newest last, as kubectl get events
        print()
        print(_table(["TIME", "SERVICE", "INSTANCE", "NODE/WORKER", "CAUSE"],
                     [row for _, row in recent]))


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

    status = remote("status", "services, instances, health and recent causes, like kubectl get")
    status.add_argument("service", nargs="*", help="only these services")
    status.add_argument("--events", type=_event_count, default=3, metavar="N",
                        help="recent events per instance, where the gateway keeps them "
                             "(default 3; 0: do not read them)")
    status.add_argument("--json", action="store_true", help="print JSON instead")
    status.set_defaults(func=cmd_status)

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
