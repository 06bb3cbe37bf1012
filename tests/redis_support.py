"""Redis for tests: the machine's shared server (own DB and key prefix per test, cleaned up) and
private ``redis-server`` processes that a test may stop and restart at will.

The shared server on 127.0.0.1:6379 is never stopped by a test. In CI (``CI`` set) the Redis
tests must run: an unreachable server fails them instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from tests.support import READY_TIMEOUT, free_port, wait_for

SHARED_HOST, SHARED_PORT = "127.0.0.1", 6379
#: The database the tests use on the shared server (the bench uses 14).
TEST_DB = 15


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI is set: the Redis tests must run)")
    pytest.skip(reason)


def require_shared_redis() -> None:
    """Skip (fail in CI) unless the shared Redis on 127.0.0.1:6379 answers."""
    client = redis.Redis(SHARED_HOST, SHARED_PORT, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable(f"no Redis on {SHARED_HOST}:{SHARED_PORT} ({exc}); start one with "
                     "redis-server --daemonize yes --port 6379 --save '' --appendonly no")
    finally:
        client.close()


def require_redis_server() -> str:
    """The ``redis-server`` binary, or skip (fail in CI)."""
    path = shutil.which("redis-server")
    if path is None:
        _unavailable("redis-server is not on PATH (apt-get install redis-server)")
    return path


class SharedPrefix:
    """A unique key prefix on the shared server's test DB; :meth:`cleanup` deletes its keys.

    Its ``url`` lets a write wait 10 s for Redis and a rate-limit check 5 s (not 1 s and
    0.25 s): on a busy machine a slow answer would fail a write ("LATE ... nothing was
    changed") or let a request through uncounted, where the test is about something else.
    Tests of those deadlines run a ``redis-server`` or a :class:`SilentServer` of their own."""

    def __init__(self, db: int = TEST_DB) -> None:
        self.db = db
        self.prefix = f"test-{uuid.uuid4().hex[:12]}:"
        self.url = (f"redis://{SHARED_HOST}:{SHARED_PORT}/{db}?prefix={self.prefix}"
                    "&socket_timeout=10&rate_limit_timeout=5")
        self.client = redis.Redis(SHARED_HOST, SHARED_PORT, db=db, decode_responses=True,
                                  socket_timeout=5)

    def keys(self) -> list[str]:
        return sorted(self.client.scan_iter(match=self.prefix + "*", count=1000))

    def cleanup(self) -> None:
        keys = self.keys()
        if keys:
            self.client.delete(*keys)
        self.client.close()


class RedisServer:
    """A private ``redis-server`` on a free port, in the foreground so it can be stopped.

    ``args`` are added to the plain command line (port, loopback, no persistence by default);
    ``argv`` replaces the whole command (a Sentinel, a TLS-only server), in which case
    ``client`` are the redis-py arguments that reach it for the readiness check.
    """

    PLAIN = ("--save", "", "--appendonly", "no")

    def __init__(self, work_dir: Path, port: int | None = None, args: tuple[str, ...] = PLAIN,
                 argv: list[str] | None = None, client: dict | None = None) -> None:
        self.binary = require_redis_server()
        self.work_dir = work_dir
        self.port = port or free_port()
        self.args = args
        self.argv = argv
        self.client_kwargs = client or {}
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = work_dir / f"redis-{self.port}.log"

    def start(self) -> RedisServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        argv = self.argv or [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                             "--daemonize", "no", "--dir", str(self.work_dir), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        kwargs = {"host": "127.0.0.1", "port": self.port, "socket_connect_timeout": 0.2,
                  "socket_timeout": 0.5, **self.client_kwargs}
        client = redis.Redis(**kwargs)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n"
                                     + self.log_path.read_text(errors="replace"))
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(up, READY_TIMEOUT, 0.02, f"redis-server on port {self.port}")
        finally:
            client.close()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SilentServer:
    """A port that accepts TCP connections and never answers: a hung or partitioned Redis."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)  # the kernel completes handshakes; nobody ever reads
        self.port = self.sock.getsockname()[1]

    def url(self, **options: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"redis://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()
