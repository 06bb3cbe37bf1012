"""``sqlite:///PATH``: the default store, one file shared by every worker of one machine.

WAL mode lets the workers read while one writes; ``synchronous=FULL`` makes a commit durable
before the registry answers 2xx, so an acknowledged write survives ``kill -9`` and power loss.
Each write runs in ``BEGIN IMMEDIATE`` (one writer at a time across processes, waiting up to
the busy timeout), bumps the ``version`` row in the same transaction, and sets the version of
each service it touched in ``changes`` (one row per service, indexed by version), so a worker
reads only what changed after its snapshot. Rows older than :data:`CHANGE_HISTORY` versions
are dropped; ``changes_since`` is the version the history starts from (the version when the
table was made, for a file older than it).

Connections are per process: one is opened lazily after ``fork`` and never inherited.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .base import CHANGE_HISTORY, InstanceRecord, Store, StoreChanges, StoreError, StoreState
from .healthboard import HealthBoard, SQLiteBoard, health_path

T = TypeVar("T")

#: Milliseconds a writer waits for another process's write lock before giving up.
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    service       TEXT NOT NULL,
    id            TEXT NOT NULL,
    address       TEXT NOT NULL,
    weight        INTEGER NOT NULL,
    metadata      TEXT NOT NULL,
    ttl           REAL,
    registered_at REAL NOT NULL,
    expires_at    REAL,
    draining      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (service, id)
);
CREATE TABLE IF NOT EXISTS policies (
    service TEXT PRIMARY KEY,
    body    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
CREATE TABLE IF NOT EXISTS changes (
    service TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_version ON changes (version);
INSERT OR IGNORE INTO meta (key, value)
    SELECT 'changes_since', value FROM meta WHERE key = 'version';
CREATE INDEX IF NOT EXISTS instances_by_expiry ON instances (expires_at)
    WHERE expires_at IS NOT NULL;
"""

_COLUMNS = "service, id, address, weight, metadata, ttl, registered_at, expires_at, draining"


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _is_prepared(conn: sqlite3.Connection) -> bool:
    """WAL mode set and the schema there: reads only."""
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        return False
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index'"
                        " AND name = 'instances_by_expiry'").fetchone() is not None


def _create(conn: sqlite3.Connection) -> None:
    """Set WAL mode and create the schema (idempotent; takes the write lock)."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def prepare(path: str | Path) -> None:
    """Create the database file, its schema and WAL mode, once, before any worker opens it
    (gunicorn's ``on_starting``, in the master): workers then never write to start, so a
    busy database cannot leave one without its registry. Raises :class:`StoreError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = _open(path)
        try:
            _create(conn)
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"sqlite store {path}: {exc}") from exc


def _record(row: tuple) -> InstanceRecord:
    service, id_, address, weight, metadata, ttl, registered_at, expires_at, draining = row
    return InstanceRecord(
        service=service, id=id_, address=address, weight=weight,
        metadata=json.loads(metadata), ttl=ttl, registered_at=registered_at,
        expires_at=expires_at, draining=bool(draining),
    )


class SQLiteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    def make_health_board(self) -> HealthBoard:
        """A board in a file next to the registry's, shared by this machine's workers."""
        return SQLiteBoard(health_path(self.path))

    # -- connection ------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            conn = _open(self.path)
            try:
                # Under gunicorn the master made the file (prepare(), before forking): a
                # worker only reads here, so another process's write cannot make it fail.
                # Alone (tests, a single process), the first connection makes it.
                if not _is_prepared(conn):
                    _create(conn)
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return fn(self._connection())
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[tuple[sqlite3.Connection, set[str]]]:
        """A write transaction: the block adds the services it touches to the set it is
        given; then the version is bumped and noted for each of them. Rolled back whole on
        any error, and quietly on :class:`_NoChange`."""
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
            touched: set[str] = set()
            try:
                yield conn, touched
                conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'")
                version = conn.execute(
                    "SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
                conn.executemany("INSERT OR REPLACE INTO changes (service, version) VALUES (?, ?)",
                                 [(name, version) for name in touched])
                conn.execute("DELETE FROM changes WHERE version <= ?",
                             (version - CHANGE_HISTORY,))
                conn.execute("COMMIT")
            except _NoChange:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- reads -----------------------------------------------------------------------------

    def version(self) -> int:
        return self._run(
            lambda c: c.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
        )

    def load(self) -> StoreState:
        def read(conn: sqlite3.Connection) -> StoreState:
            conn.execute("BEGIN")
            try:
                version = conn.execute(
                    "SELECT value FROM meta WHERE key = 'version'").fetchone()[0]
                rows = conn.execute(f"SELECT {_COLUMNS} FROM instances").fetchall()
                policies = conn.execute("SELECT service, body FROM policies").fetchall()
            finally:
                conn.execute("COMMIT")
            return StoreState(
                version=version,
                instances=tuple(_record(r) for r in rows),
                policies={s: json.loads(b) for s, b in policies},
                now=time.time(),
            )

        return self._run(read)

    def changes(self, since: int) -> StoreChanges | None:
        def read(conn: sqlite3.Connection) -> StoreChanges | None:
            conn.execute("BEGIN")
            try:
                meta = dict(conn.execute(
                    "SELECT key, value FROM meta WHERE key IN ('version', 'changes_since')"))
                version = meta["version"]
                floor = max(meta["changes_since"], version - CHANGE_HISTORY)
                if not floor <= since <= version:
                    return None
                names = [n for (n,) in conn.execute(
                    "SELECT service FROM changes WHERE version > ?", (since,))]
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM instances WHERE service IN"
                    " (SELECT service FROM changes WHERE version > ?)", (since,)).fetchall()
                policies = conn.execute(
                    "SELECT service, body FROM policies WHERE service IN"
                    " (SELECT service FROM changes WHERE version > ?)", (since,)).fetchall()
            finally:
                conn.execute("COMMIT")
            return StoreChanges(
                version=version,
                services=frozenset(names),
                instances=tuple(_record(r) for r in rows),
                policies={n: json.loads(b) for n, b in policies},
                now=time.time(),
            )

        return self._run(read)

    def next_expiry(self) -> float | None:
        return self._run(lambda c: c.execute(  # the index's first entry
            "SELECT MIN(expires_at) FROM instances WHERE expires_at IS NOT NULL").fetchone()[0])

    # -- writes ----------------------------------------------------------------------------

    def register(self, record: InstanceRecord) -> tuple[InstanceRecord, bool]:
        now = time.time()
        expires_at = now + record.ttl if record.ttl is not None else None
        with self._write() as (conn, touched):
            touched.add(record.service)
            old = conn.execute(
                "SELECT registered_at FROM instances WHERE service = ? AND id = ?",
                (record.service, record.id),
            ).fetchone()
            registered_at = old[0] if old else now
            conn.execute(
                f"INSERT OR REPLACE INTO instances ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (record.service, record.id, record.address, record.weight,
                 json.dumps(record.metadata, separators=(",", ":")), record.ttl,
                 registered_at, expires_at, 0),
            )
        stored = InstanceRecord(
            service=record.service, id=record.id, address=record.address, weight=record.weight,
            metadata=record.metadata, ttl=record.ttl, registered_at=registered_at,
            expires_at=expires_at, draining=False,
        )
        return stored, old is None

    def _get(self, conn: sqlite3.Connection, service: str, instance_id: str):
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM instances WHERE service = ? AND id = ?",
            (service, instance_id),
        ).fetchone()
        return _record(row) if row else None

    def heartbeat(self, service: str, instance_id: str) -> InstanceRecord | None:
        found = None
        with self._write() as (conn, touched):
            touched.add(service)
            conn.execute(
                "UPDATE instances SET expires_at = ? + ttl"
                " WHERE service = ? AND id = ? AND ttl IS NOT NULL",
                (time.time(), service, instance_id),
            )
            found = self._get(conn, service, instance_id)
            if found is None or found.ttl is None:
                raise _NoChange
        return found

    def remove_instance(self, service: str, instance_id: str) -> InstanceRecord | None:
        found = None
        with self._write() as (conn, touched):
            touched.add(service)
            found = self._get(conn, service, instance_id)
            if found is None:
                raise _NoChange
            conn.execute("DELETE FROM instances WHERE service = ? AND id = ?",
                         (service, instance_id))
        return found

    def remove_service(self, service: str) -> list[InstanceRecord]:
        removed: list[InstanceRecord] = []
        with self._write() as (conn, touched):
            touched.add(service)
            rows = conn.execute(f"SELECT {_COLUMNS} FROM instances WHERE service = ?",
                                (service,)).fetchall()
            removed = [_record(r) for r in rows]
            if not removed:
                raise _NoChange
            conn.execute("DELETE FROM instances WHERE service = ?", (service,))
        return removed

    def set_draining(self, service: str, instance_id: str,
                     draining: bool = True) -> InstanceRecord | None:
        found = None
        with self._write() as (conn, touched):
            touched.add(service)
            changed = conn.execute(
                "UPDATE instances SET draining = ? WHERE service = ? AND id = ? AND draining != ?",
                (int(draining), service, instance_id, int(draining))).rowcount
            found = self._get(conn, service, instance_id)
            if not changed:
                raise _NoChange
        return found

    def purge_expired(self) -> int:
        count = 0
        with self._write() as (conn, touched):
            now = time.time()
            touched.update(n for (n,) in conn.execute(
                "SELECT DISTINCT service FROM instances"
                " WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)))
            if not touched:
                raise _NoChange
            count = conn.execute(
                "DELETE FROM instances WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (now,),
            ).rowcount
        return count

    def put_policy(self, service: str, policy: dict[str, Any]) -> None:
        with self._write() as (conn, touched):
            touched.add(service)
            conn.execute("INSERT OR REPLACE INTO policies (service, body) VALUES (?, ?)",
                         (service, json.dumps(policy, separators=(",", ":"))))

    def delete_policy(self, service: str) -> bool:
        found = False
        with self._write() as (conn, touched):
            touched.add(service)
            found = conn.execute("DELETE FROM policies WHERE service = ?",
                                 (service,)).rowcount > 0
            if not found:
                raise _NoChange
        return found


class _NoChange(Exception):
    """Raised inside a write transaction that turned out to change nothing: roll back quietly,
    leaving the version where it is so no worker reloads for nothing."""
