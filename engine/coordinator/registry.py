"""The coordinator's record of nodes, in SQLite (the standard library's, no server to run).

Every node that ever registered keeps a row (history is useful to operators); ``online`` marks
the ones with a live WebSocket. On start all rows are marked offline: live state is rebuilt by the
nodes reconnecting, never trusted from a previous run.

A row's span (``unit_start``..``unit_end``, in pack fragments) is what the node has LOADED and
can serve, which is what routes may use; what the placement asked it to load next lives in the
coordinator's memory, since it is recomputed from live measurements after a restart anyway.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    peer_id    TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    joined_at  REAL NOT NULL,
    last_seen  REAL NOT NULL,
    model_id   TEXT,
    unit_start INTEGER,
    unit_end   INTEGER,
    ready      INTEGER NOT NULL DEFAULT 0,
    online     INTEGER NOT NULL DEFAULT 1,
    info       TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS bans (
    peer_id    TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    banned_at  REAL NOT NULL,
    job_id     TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    name       TEXT PRIMARY KEY,
    value      BLOB NOT NULL
);
"""
#: Columns added since the first schema; a registry file from an older version gains them on open.
_ADDED_COLUMNS = {"unit_start": "INTEGER", "unit_end": "INTEGER"}


@dataclass(frozen=True)
class NodeRow:
    """A live node as the coordinator's decisions see it: what it serves and whether it is usable."""

    peer_id: str
    name: str
    model_id: str | None
    #: fragments [start, end) of ``model_id`` the node has loaded, if any
    span: tuple[int, int] | None
    ready: bool


class Registry:
    """Node rows in one SQLite database file (``:memory:`` for throwaway coordinators)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # No fsync per write: live state is rebuilt from reconnecting nodes after any restart (see
        # above), and WAL stays consistent after a crash; an fsync per registration on the event
        # loop is what slowed a storm of 1,000 joining nodes most.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(nodes)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE nodes ADD COLUMN {column} {kind}")
        self._db.execute("CREATE INDEX IF NOT EXISTS nodes_online_span ON nodes(online, model_id)")
        self._db.execute("UPDATE nodes SET online = 0, ready = 0")

    def close(self) -> None:
        self._db.close()

    def secret(self, name: str, make: Callable[[], bytes]) -> bytes:
        """A named secret kept across restarts (created with ``make`` the first time)."""
        self._db.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, make()))
        return bytes(self._db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0])

    def ban(self, peer_id: str, name: str, job_id: str, reason: str) -> None:
        """Ban a node for good (a spot check caught it); the first reason is kept."""
        self._db.execute(
            "INSERT OR IGNORE INTO bans (peer_id, name, banned_at, job_id, reason) VALUES (?, ?, ?, ?, ?)",
            (peer_id, name, time.time(), job_id, reason[:500]),
        )
        self._db.execute("UPDATE nodes SET online = 0, ready = 0 WHERE peer_id = ?", (peer_id,))

    def banned(self) -> dict[str, str]:
        """peer id -> why it was banned."""
        return {str(p): str(r) for p, r in self._db.execute("SELECT peer_id, reason FROM bans")}

    def add_node(self, peer_id: str, name: str, info: str = "{}") -> None:
        """A node joined; a peer id seen in an earlier run (ids come from node keys) gets a fresh row state."""
        now = time.time()
        self._db.execute(
            "INSERT INTO nodes (peer_id, name, joined_at, last_seen, info) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(peer_id) DO UPDATE SET name = excluded.name, joined_at = excluded.joined_at, "
            "last_seen = excluded.last_seen, info = excluded.info, model_id = NULL, unit_start = NULL, "
            "unit_end = NULL, ready = 0, online = 1",
            (peer_id, name, now, now, info),
        )

    def set_span(self, peer_id: str, model_id: str, span: tuple[int, int], ready: bool) -> None:
        """Record the fragments a node has loaded (and whether routes may use it now)."""
        self._db.execute(
            "UPDATE nodes SET model_id = ?, unit_start = ?, unit_end = ?, ready = ?, last_seen = ? WHERE peer_id = ?",
            (model_id, span[0], span[1], int(ready), time.time(), peer_id),
        )

    def set_ready(self, peer_id: str, ready: bool) -> None:
        self._db.execute(
            "UPDATE nodes SET ready = ?, last_seen = ? WHERE peer_id = ?", (int(ready), time.time(), peer_id)
        )

    def set_info(self, peer_id: str, info: str) -> None:
        """Store a node's capability report (JSON: hardware, measured throughput, memory offered)."""
        self._db.execute("UPDATE nodes SET info = ? WHERE peer_id = ?", (info, peer_id))

    def touch(self, peer_id: str) -> None:
        self._db.execute("UPDATE nodes SET last_seen = ? WHERE peer_id = ?", (time.time(), peer_id))

    def set_online(self, peer_id: str) -> None:
        self._db.execute("UPDATE nodes SET online = 1, last_seen = ? WHERE peer_id = ?", (time.time(), peer_id))

    def set_offline(self, peer_id: str) -> None:
        self._db.execute(
            "UPDATE nodes SET online = 0, ready = 0, last_seen = ? WHERE peer_id = ?", (time.time(), peer_id)
        )

    def online_nodes(self) -> list[NodeRow]:
        rows = self._db.execute(
            "SELECT peer_id, name, model_id, unit_start, unit_end, ready FROM nodes WHERE online = 1 ORDER BY joined_at"
        ).fetchall()
        return [
            NodeRow(r[0], r[1], r[2], None if r[3] is None or r[4] is None else (int(r[3]), int(r[4])), bool(r[5]))
            for r in rows
        ]

    def describe(self) -> list[dict[str, object]]:
        rows = self._db.execute(
            "SELECT peer_id, name, joined_at, last_seen, model_id, unit_start, unit_end, ready, online, info "
            "FROM nodes WHERE online = 1 ORDER BY joined_at"
        ).fetchall()
        keys = ("peer_id", "name", "joined_at", "last_seen", "model_id", "unit_start", "unit_end", "ready", "online")
        return [{**dict(zip(keys, r[:-1], strict=True)), "capability": json.loads(r[-1])} for r in rows]
