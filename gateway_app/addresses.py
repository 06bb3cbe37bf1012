"""Upstream addresses the gateway never connects to, in one place.

An upstream is refused when it is, or resolves to, an address in :data:`REFUSED_RANGES`
(extended by ``GATEWAY_UPSTREAM_DENY``), or the gateway's own listening address. The check
runs twice:

* at registration, on an IP literal in the address (:mod:`~gateway_app.validation`);
* every time the transport opens a connection (:mod:`~gateway_app.transport`): the name is
  resolved then, every address it resolves to is checked, and the connection goes to one of
  the checked addresses, never to a name resolved again (a DNS answer that changes between
  the check and the connection, DNS rebinding, cannot slip through). Health probes use the
  same transport, so they are checked alike.

An IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, and the NAT64
well-known prefix ``64:ff9b::/96`` of RFC 6052) is checked as that IPv4 address too:
``[64:ff9b::a9fe:a9fe]`` reaches 169.254.169.254 through a NAT64 gateway.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The ranges no upstream connection goes to, and why. Private ranges (10/8, 192.168/16,
#: fc00::/7...) and loopback are where upstreams usually live, so they are allowed; add what
#: your network needs refused with ``GATEWAY_UPSTREAM_DENY``.
REFUSED_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified ('this network'; 0.0.0.0 reaches this host)"),
    ("169.254.0.0/16", "link-local (where clouds serve instance metadata)"),
    ("100.100.100.200/32", "Alibaba Cloud instance metadata"),
    ("192.0.0.192/32", "Oracle Cloud instance metadata"),
    ("168.63.129.16/32", "Azure platform endpoint (WireServer)"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("::/128", "unspecified"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "AWS instance metadata over IPv6"),
    ("ff00::/8", "multicast"),
)

_REFUSED: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in REFUSED_RANGES)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

#: ``socket.getaddrinfo``'s signature: what the transport resolves names with.
Resolver = Callable[..., list[tuple[Any, ...]]]


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64), else ``None``."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an IP address (brackets and an IPv6 zone dropped), else ``None``."""
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def refused_range(ip: IPAddress, extra: Iterable[Network] = ()) -> str | None:
    """Why ``ip`` is refused (or the IPv4 address it carries is), or ``None``."""
    for candidate in (ip, embedded_ipv4(ip)):
        if candidate is None:
            continue
        for network, why in _REFUSED:
            if candidate in network:
                return f"{candidate} is {why}"
        for network in extra:
            if candidate in network:
                return f"{candidate} is in GATEWAY_UPSTREAM_DENY ({network})"
    return None


def ip_addresses(host: str, resolve: Resolver = socket.getaddrinfo) -> set[IPAddress]:
    """The IP addresses ``host`` stands for (empty when it does not resolve); IPv4-mapped
    IPv6 addresses as their IPv4 address."""
    literal = parse_ip(host)
    if literal is not None:
        return {literal}
    try:
        infos = resolve(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    found = set()
    for info in infos:
        ip = parse_ip(str(info[4][0]))
        if ip is None:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        found.add(ip)
    return found


class AddressRefused(Exception):
    """An upstream host is, or resolves to, a refused address: nothing was sent to it."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason


class AddressPolicy:
    """What the transport may connect to: not :data:`REFUSED_RANGES`, not the ``extra``
    networks, not the gateway's own listening address (``bind``, ``HOST:PORT``).

    Made once per process; :meth:`resolve` runs only when a new connection is opened.
    """

    def __init__(self, extra: Iterable[Network] = (), bind: str | None = None,
                 resolve: Resolver = socket.getaddrinfo) -> None:
        self.extra = tuple(extra)
        self._resolve = resolve
        #: The gateway's own port and addresses; ``None`` as addresses: every local address.
        self._own_port: int | None = None
        self._own: frozenset[IPAddress] | None = frozenset()
        self._local: frozenset[IPAddress] = frozenset()
        if bind and not bind.startswith(("unix:", "fd://")):
            host, _, port = bind.rpartition(":")
            if port.isdigit():
                self._own_port = int(port)
                listening = ip_addresses(host or "0.0.0.0", resolve)  # noqa: S104 (compared)
                if any(ip.is_unspecified for ip in listening):
                    # Listening everywhere: every address of this machine is the gateway's.
                    self._own = None
                    self._local = frozenset(ip_addresses(socket.gethostname(), resolve))
                else:
                    self._own = frozenset(listening)

    def is_own(self, ip: IPAddress, port: int) -> bool:
        """True when ``ip``:``port`` is where this gateway listens: a request sent there
        would come back to it."""
        if port != self._own_port:
            return False
        for candidate in (ip, embedded_ipv4(ip)):
            if candidate is None:
                continue
            if self._own is None:
                if candidate.is_loopback or candidate.is_unspecified or candidate in self._local:
                    return True
            elif candidate in self._own:
                return True
        return False

    def refusal(self, ip: IPAddress, port: int) -> str | None:
        """Why a connection to ``ip``:``port`` is refused, or ``None``."""
        why = refused_range(ip, self.extra)
        if why is None and self.is_own(ip, port):
            why = f"{ip}:{port} is where this gateway listens"
        return why

    def resolve(self, host: str, port: int) -> list[tuple[int, str]]:
        """The addresses to connect to for ``host``:``port``, as (family, ip), in the
        resolver's order: every one checked. :class:`AddressRefused` when any of them is
        refused (a name with one bad address is not trusted with the others);
        :class:`socket.gaierror` when the name does not resolve."""
        infos = self._resolve(host, port, type=socket.SOCK_STREAM)
        addresses: list[tuple[int, str]] = []
        for family, _type, _proto, _name, sockaddr in infos:
            text = str(sockaddr[0])
            ip = parse_ip(text)
            if ip is None:
                raise AddressRefused(host, f"the resolver answered {text!r}, not an address")
            why = self.refusal(ip, port)
            if why is not None:
                raise AddressRefused(host, why)
            if (family, text) not in addresses:
                addresses.append((family, text))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} resolves to no address")
        return addresses
