"""The coordinator's node registry: served spans, and registry files written by older versions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from engine.coordinator.registry import NodeRow, Registry

OLD_SCHEMA = """
CREATE TABLE nodes (
    peer_id TEXT PRIMARY KEY, name TEXT NOT NULL, joined_at REAL NOT NULL, last_seen REAL NOT NULL,
    model_id TEXT, fragment INTEGER, ready INTEGER NOT NULL DEFAULT 0, online INTEGER NOT NULL DEFAULT 1,
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX nodes_online ON nodes(online, model_id, fragment);
INSERT INTO nodes (peer_id, name, joined_at, last_seen, model_id, fragment, ready, online)
VALUES ('n-old', 'old', 1.0, 1.0, 'm', 2, 1, 1);
"""


def test_spans_and_readiness() -> None:
    reg = Registry(":memory:")
    reg.add_node("n-a", "a")
    reg.add_node("n-b", "b")
    assert reg.online_nodes() == [NodeRow("n-a", "a", None, None, False), NodeRow("n-b", "b", None, None, False)]
    reg.set_span("n-a", "m", (3, 9), ready=True)
    reg.set_offline("n-b")
    assert reg.online_nodes() == [NodeRow("n-a", "a", "m", (3, 9), True)]
    described = reg.describe()[0]
    assert (described["unit_start"], described["unit_end"], described["ready"]) == (3, 9, 1)
    reg.close()


def test_a_registry_file_from_an_older_version_gains_the_span_columns(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.commit()
    db.close()
    reg = Registry(path)
    assert reg.online_nodes() == []  # nothing is trusted from a previous run
    reg.set_online("n-old")
    reg.set_span("n-old", "m", (0, 2), ready=True)
    assert reg.online_nodes() == [NodeRow("n-old", "old", "m", (0, 2), True)]
    reg.close()


def test_a_node_rejoining_after_a_coordinator_restart_gets_a_fresh_row(tmp_path: Path) -> None:
    # Peer ids come from node keys, so a restarted coordinator sees the same id again.
    path = tmp_path / "registry.sqlite3"
    reg = Registry(path)
    reg.add_node("n-a", "a")
    reg.set_span("n-a", "m", (0, 2), ready=True)
    reg.close()
    reg = Registry(path)
    assert reg.online_nodes() == []
    reg.add_node("n-a", "renamed")
    assert reg.online_nodes() == [NodeRow("n-a", "renamed", None, None, False)]
    reg.close()
