"""The coordinator's record of nodes, in SQLite (the standard library's, no server to run).

Every node that ever registered keeps a row (history is useful to operators); ``online`` marks
the ones with a live WebSocket. On start all rows are marked offline: live state is rebuilt by the
nodes reconnecting, never trusted from a previous run.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from engine.scheduler.placement import NodeView

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    peer_id    TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    joined_at  REAL NOT NULL,
    last_seen  REAL NOT NULL,
    model_id   TEXT,
    fragment   INTEGER,
    ready      INTEGER NOT NULL DEFAULT 0,
    online     INTEGER NOT NULL DEFAULT 1,
    info       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS nodes_online ON nodes(online, model_id, fragment);
"""


class Registry:
    """Node rows in one SQLite database file (``:memory:`` for throwaway coordinators)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._db.execute("UPDATE nodes SET online = 0, ready = 0")

    def close(self) -> None:
        self._db.close()

    def add_node(self, peer_id: str, name: str, info: str = "{}") -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO nodes (peer_id, name, joined_at, last_seen, info) VALUES (?, ?, ?, ?, ?)",
            (peer_id, name, now, now, info),
        )

    def assign(self, peer_id: str, model_id: str, fragment: int) -> None:
        self._db.execute(
            "UPDATE nodes SET model_id = ?, fragment = ?, ready = 0 WHERE peer_id = ?", (model_id, fragment, peer_id)
        )

    def set_ready(self, peer_id: str, ready: bool) -> None:
        self._db.execute(
            "UPDATE nodes SET ready = ?, last_seen = ? WHERE peer_id = ?", (int(ready), time.time(), peer_id)
        )

    def set_info(self, peer_id: str, info: str) -> None:
        """Store a node's capability report (JSON: hardware and measured throughput)."""
        self._db.execute("UPDATE nodes SET info = ? WHERE peer_id = ?", (info, peer_id))

    def touch(self, peer_id: str) -> None:
        self._db.execute("UPDATE nodes SET last_seen = ? WHERE peer_id = ?", (time.time(), peer_id))

    def set_online(self, peer_id: str) -> None:
        self._db.execute("UPDATE nodes SET online = 1, last_seen = ? WHERE peer_id = ?", (time.time(), peer_id))

    def set_offline(self, peer_id: str) -> None:
        self._db.execute(
            "UPDATE nodes SET online = 0, ready = 0, last_seen = ? WHERE peer_id = ?", (time.time(), peer_id)
        )

    def online_nodes(self) -> list[NodeView]:
        rows = self._db.execute(
            "SELECT peer_id, name, model_id, fragment, ready FROM nodes WHERE online = 1 ORDER BY joined_at"
        ).fetchall()
        return [NodeView(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def describe(self) -> list[dict[str, object]]:
        rows = self._db.execute(
            "SELECT peer_id, name, joined_at, last_seen, model_id, fragment, ready, online, info FROM nodes "
            "WHERE online = 1 ORDER BY joined_at"
        ).fetchall()
        keys = ("peer_id", "name", "joined_at", "last_seen", "model_id", "fragment", "ready", "online")
        return [{**dict(zip(keys, r[:-1], strict=True)), "capability": json.loads(r[-1])} for r in rows]
