"""Health boards: where every worker of a gateway (and, with Redis, every node) keeps the shared
health of instances, their timelines and the counts of requests in flight.

A board holds, per instance (keyed ``SERVICE/ID``):

* its state, a small JSON object (consecutive failures, ejection, active-check results...),
  replaced whole by :meth:`HealthBoard.update`, a read-modify-write that is atomic across
  processes, and tagged with the board's change counter so that a worker reads only the states
  that changed since it last looked (:meth:`HealthBoard.changed`);
* its timeline: the last :data:`EVENTS_KEPT` events, appended by the same update;
* a probe claim, so that one worker probes an instance per interval, not every worker.

And, per worker, the counts of its requests in flight (:meth:`HealthBoard.report`), summed by
:meth:`HealthBoard.in_flight` over the workers that reported lately.

Boards are written on transitions and read by a background thread: never on the success path
of a request. Every method raises :class:`~gateway_app.stores.StoreError` when the board cannot
be reached, having changed nothing.

:class:`LocalBoard` keeps all this in the process (the ``memory://`` store: one process);
:class:`SQLiteBoard` in a SQLite file next to the registry's (every worker of one machine);
:class:`~gateway_app.stores.redis_health.RedisBoard` in Redis (every node).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from .base import StoreError

T = TypeVar("T")

#: Events kept per instance (newest last).
EVENTS_KEPT = 64
#: Seconds after which a worker that stopped reporting no longer counts in the in-flight sums.
WORKER_STALE = 5.0
#: Most bytes of one event as stored (its cause is cut to fit).
MAX_EVENT_BYTES = 1024
#: Most characters of an event's cause.
MAX_CAUSE = 200

#: A state change: given the current state (``{}`` when there is none), the new state (or
#: ``None`` to leave it), the event to append (or ``None``), and what to return to the caller.
Change = Callable[[dict[str, Any]], tuple[dict[str, Any] | None, dict[str, Any] | None, T]]


def encode_event(event: dict[str, Any]) -> str:
    """The event as stored: JSON of at most :data:`MAX_EVENT_BYTES` (a bulky value is cut)."""
    event = {**event, "cause": str(event.get("cause", ""))[:MAX_CAUSE]}
    text = json.dumps(event, separators=(",", ":"))
    if len(text.encode()) > MAX_EVENT_BYTES:
        event["value"] = None
        text = json.dumps(event, separators=(",", ":"))
    return text


class HealthBoard(ABC):
    """What the health tracker needs from a shared board. Safe across threads."""

    @abstractmethod
    def version(self) -> int:
        """The change counter of states; cheap (read by each worker a few times a second)."""

    @abstractmethod
    def changed(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        """The states changed after version ``since`` (all of them for ``-1``), and the
        version they are at."""

    @abstractmethod
    def states(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The states of ``keys`` that have one."""

    @abstractmethod
    def update(self, key: str, change: Change[T]) -> tuple[T, dict[str, Any]]:
        """Apply ``change`` to ``key``'s state atomically (across processes); its result and
        the state as it is now."""

    @abstractmethod
    def events(self, key: str) -> list[dict[str, Any]]:
        """``key``'s timeline, oldest first."""

    @abstractmethod
    def forget(self, keys: Iterable[str], before: float) -> None:
        """Remove the states and timelines of ``keys`` not updated since ``before`` (an
        instance removed and registered again meanwhile keeps its new ones)."""

    @abstractmethod
    def keys(self) -> set[str]:
        """Every key with a state."""

    @abstractmethod
    def claim(self, key: str, now: float, seconds: float) -> bool:
        """Take the right to probe ``key`` for ``seconds`` unless someone holds it."""

    @abstractmethod
    def report(self, worker: str, counts: dict[str, int], now: float) -> None:
        """Say how many requests ``worker`` has in flight to each instance (zeros left out)."""

    @abstractmethod
    def in_flight(self, now: float) -> dict[str, int]:
        """Requests in flight per instance, summed over the workers that reported lately."""

    def close(self) -> None:  # noqa: B027 (optional to override)
        """Release connections; the board may be reopened by the next call."""


class LocalBoard(HealthBoard):
    """A board inside one process (the ``memory://`` store, tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        #: key -> (version, updated, state)
        self._states: dict[str, tuple[int, float, dict[str, Any]]] = {}
        self._events: dict[str, list[str]] = {}
        self._claims: dict[str, float] = {}
        self._workers: dict[str, tuple[float, dict[str, int]]] = {}

    def version(self) -> int:
        return self._version

    def changed(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        with self._lock:
            return self._version, {k: dict(s) for k, (v, _, s) in self._states.items()
                                   if v > since}

    def states(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(self._states[k][2]) for k in keys if k in self._states}

    def update(self, key: str, change: Change[T]) -> tuple[T, dict[str, Any]]:
        with self._lock:
            old = self._states.get(key)
            current = dict(old[2]) if old else {}
            state, event, result = change(current)
            if state is not None:
                self._version += 1
                self._states[key] = (self._version, state.get("updated", 0.0), dict(state))
                current = state
            if event is not None:
                timeline = self._events.setdefault(key, [])
                timeline.append(encode_event(event))
                del timeline[:-EVENTS_KEPT]
            return result, current

    def events(self, key: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(e) for e in self._events.get(key, ())]

    def forget(self, keys: Iterable[str], before: float) -> None:
        with self._lock:
            for key in keys:
                old = self._states.get(key)
                if old is None or old[1] < before:
                    self._states.pop(key, None)
                    self._events.pop(key, None)
                    self._claims.pop(key, None)

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._states) | set(self._events)

    def claim(self, key: str, now: float, seconds: float) -> bool:
        with self._lock:
            if self._claims.get(key, 0.0) > now:
                return False
            self._claims[key] = now + seconds
            return True

    def report(self, worker: str, counts: dict[str, int], now: float) -> None:
        with self._lock:
            self._workers[worker] = (now, dict(counts))

    def in_flight(self, now: float) -> dict[str, int]:
        with self._lock:
            return _sum_counts(self._workers.values(), now)


def _sum_counts(rows: Iterable[tuple[float, dict[str, int]]], now: float) -> dict[str, int]:
    total: dict[str, int] = {}
    for seen, counts in rows:
        if seen >= now - WORKER_STALE:
            for key, n in counts.items():
                total[key] = total.get(key, 0) + n
    return total


_SCHEMA = """
CREATE TABLE IF NOT EXISTS states (
    key         TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    updated     REAL NOT NULL,
    probe_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS states_by_version ON states (version);
CREATE TABLE IF NOT EXISTS events (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    key   TEXT NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_key ON events (key, seq);
CREATE TABLE IF NOT EXISTS workers (
    worker TEXT PRIMARY KEY,
    seen   REAL NOT NULL,
    counts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
"""

#: Milliseconds a write waits for another process's.
BUSY_TIMEOUT_MS = 2000


def health_path(registry_path: str | Path) -> Path:
    """The health board's file for a SQLite registry file: ``registry.db`` ->
    ``registry.health.db``, in the same directory."""
    path = Path(registry_path)
    return path.with_name(f"{path.stem}.health{path.suffix or '.db'}")


def prepare(path: str | Path) -> None:
    """Create the board's file (schema, WAL), before workers fork. Raises StoreError."""
    board = SQLiteBoard(path)
    try:
        board.version()
    finally:
        board.close()


class SQLiteBoard(HealthBoard):
    """A board in a SQLite file shared by the workers of one machine.

    Health is not the registry: a commit here is not flushed to disk (``synchronous=NORMAL``
    in WAL mode), so writing a transition costs tens of microseconds, and a power cut may lose
    the last ones (the gateway then relearns them from traffic and probes).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() \
                        is None:
                    conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _do(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return fn(self._connection())
            except (sqlite3.Error, OSError) as exc:
                conn = self._conn
                if conn is not None and conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        self._conn = None
                raise StoreError(f"health board {self.path}: {exc}") from exc

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        return self._do(run)

    def version(self) -> int:
        return self._do(lambda c: int(c.execute(
            "SELECT value FROM meta WHERE key = 'version'").fetchone()[0]))

    def changed(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        def read(conn: sqlite3.Connection) -> tuple[int, dict[str, dict[str, Any]]]:
            conn.execute("BEGIN")
            try:
                version = conn.execute("SELECT value FROM meta WHERE key = 'version'"
                                       ).fetchone()[0]
                rows = conn.execute("SELECT key, state FROM states WHERE version > ?",
                                    (since,)).fetchall()
            finally:
                conn.execute("COMMIT")
            return int(version), {k: json.loads(s) for k, s in rows}
        return self._do(read)

    def states(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = list(keys)

        def read(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            found = {}
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                marks = ",".join("?" * len(chunk))
                for key, state in conn.execute(
                        f"SELECT key, state FROM states WHERE key IN ({marks})", chunk):  # noqa: S608
                    found[key] = json.loads(state)
            return found
        return self._do(read) if wanted else {}

    def update(self, key: str, change: Change[T]) -> tuple[T, dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> tuple[T, dict[str, Any]]:
            row = conn.execute("SELECT state FROM states WHERE key = ?", (key,)).fetchone()
            current = json.loads(row[0]) if row else {}
            state, event, result = change(current)
            if state is not None:
                conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'")
                conn.execute(
                    "INSERT INTO states (key, state, version, updated) VALUES (?, ?, "
                    "(SELECT value FROM meta WHERE key = 'version'), ?) ON CONFLICT (key) DO "
                    "UPDATE SET state = excluded.state, version = excluded.version, "
                    "updated = excluded.updated",
                    (key, json.dumps(state, separators=(",", ":")),
                     float(state.get("updated", 0.0))))
                current = state
            if event is not None:
                conn.execute("INSERT INTO events (key, event) VALUES (?, ?)",
                             (key, encode_event(event)))
                conn.execute("DELETE FROM events WHERE key = ? AND seq <= (SELECT seq FROM "
                             "events WHERE key = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                             (key, key, EVENTS_KEPT))
            return result, current
        return self._write(run)

    def events(self, key: str) -> list[dict[str, Any]]:
        rows = self._do(lambda c: c.execute(
            "SELECT event FROM events WHERE key = ? ORDER BY seq", (key,)).fetchall())
        return [json.loads(e) for (e,) in rows]

    def forget(self, keys: Iterable[str], before: float) -> None:
        gone = list(keys)

        def run(conn: sqlite3.Connection) -> None:
            for key in gone:
                row = conn.execute("SELECT updated FROM states WHERE key = ?", (key,)
                                   ).fetchone()
                if row is None or row[0] < before:
                    conn.execute("DELETE FROM states WHERE key = ?", (key,))
                    conn.execute("DELETE FROM events WHERE key = ?", (key,))
        if gone:
            self._write(run)

    def keys(self) -> set[str]:
        rows = self._do(lambda c: c.execute(
            "SELECT key FROM states UNION SELECT DISTINCT key FROM events").fetchall())
        return {k for (k,) in rows}

    def claim(self, key: str, now: float, seconds: float) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            conn.execute("INSERT OR IGNORE INTO states (key, state, version, updated) "
                         "VALUES (?, '{}', 0, 0)", (key,))
            return conn.execute("UPDATE states SET probe_until = ? WHERE key = ? AND "
                                "probe_until <= ?", (now + seconds, key, now)).rowcount == 1
        return self._write(run)

    def report(self, worker: str, counts: dict[str, int], now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO workers (worker, seen, counts) VALUES "
                         "(?, ?, ?)", (worker, now, json.dumps(counts)))
            conn.execute("DELETE FROM workers WHERE seen < ?", (now - 60 * WORKER_STALE,))
        self._write(run)

    def in_flight(self, now: float) -> dict[str, int]:
        rows = self._do(lambda c: c.execute(
            "SELECT seen, counts FROM workers WHERE seen >= ?", (now - WORKER_STALE,)
        ).fetchall())
        return _sum_counts(((seen, json.loads(counts)) for seen, counts in rows), now)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
