"""How the gateway listens: one socket per worker, so connections spread over the workers."""

from __future__ import annotations

import http.client
import socket
from collections import Counter
from pathlib import Path

from tests.support import free_port


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on ``port`` (any address), from /proc/net/tcp{,6}."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                count += 1
    return count


def test_each_worker_listens_on_its_own_socket(start_gateway):
    gateway = start_gateway(GATEWAY_WORKERS=3)
    assert listening_sockets(gateway.port) == 3


def test_keep_alive_connections_spread_over_the_workers(start_gateway):
    """32 keep-alive clients connecting at once: on one shared socket, whichever worker woke
    first took most of them; the kernel now spreads them (at least 5 of 32 per worker fails
    about once in 50,000 runs by chance)."""
    gateway = start_gateway(GATEWAY_WORKERS=2)
    connections = [http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
                   for _ in range(32)]
    for connection in connections:
        connection.connect()
    per_worker: Counter[str] = Counter()
    try:
        for connection in connections:
            connection.request("GET", "/_gateway/health")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            # A request id is a random prefix per worker process and a counter.
            per_worker[response.getheader("X-Request-ID")[:16]] += 1
    finally:
        for connection in connections:
            connection.close()
    assert len(per_worker) == 2, per_worker
    assert min(per_worker.values()) >= 5, per_worker


def test_a_taken_port_stops_the_start_at_once_with_a_message(start_gateway):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        gateway = start_gateway(wait=False, port=port)
        assert gateway.proc.wait(10) == 2
    assert f"GATEWAY_BIND: cannot listen on 127.0.0.1:{port}: address already in use" \
        in gateway.log()
