"""Jobs in SQLite, in the coordinator's database file, so a coordinator crash loses none.

Same pattern as ``registry.py``: one connection in autocommit mode with WAL, so each ``save`` is a
committed transaction before the HTTP answer goes out (a job acknowledged with 202 survives a kill).

Crash semantics, applied by ``load_live`` when a coordinator starts:

* queued jobs come back queued, with a fresh queue-timeout window: nodes also need a few seconds
  to reconnect, and failing every queued job for a restart it did not cause would lose them;
* running jobs come back running, with a fresh lease. The runner is a client that generates over
  WebRTC through nodes, not through the coordinator, so it most likely survived the restart; if it
  reports within the lease its job finishes normally, otherwise the lease fails it. Re-queueing
  instead would grant a second slot for work that may already be done.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from engine.coordinator.jobs import TERMINAL, Job, JobState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    tenant      TEXT NOT NULL,
    model       TEXT NOT NULL,
    priority    INTEGER NOT NULL,
    token       TEXT NOT NULL,
    state       TEXT NOT NULL,
    params      TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    queued_at   REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    reported_at REAL,
    error       TEXT,
    tokens      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, seq);
"""

_COLUMNS = (
    "id",
    "seq",
    "tenant",
    "model",
    "priority",
    "token",
    "state",
    "params",
    "created_at",
    "queued_at",
    "started_at",
    "finished_at",
    "reported_at",
    "error",
    "tokens",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
_LIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


class JobStore:
    """Job rows in one SQLite file (``:memory:`` for throwaway coordinators)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(self, job: Job) -> None:
        """Insert or update one job (committed on return)."""
        values = _row(job)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
        self._db.execute(
            f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
            f"ON CONFLICT(id) DO UPDATE SET {updates}",
            values,
        )

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def history(self, tenant: str | None = None, limit: int = 100) -> list[Job]:
        """The newest ``limit`` jobs (all states), oldest first."""
        where, args = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        rows = self._db.execute(f"{_SELECT} {where} ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [_job(r) for r in reversed(rows)]

    def load_live(self, now: float) -> list[Job]:
        """Queued and running jobs of a previous run, restarted as the module docstring says."""
        rows = self._db.execute(f"{_SELECT} WHERE state IN (?, ?) ORDER BY seq", _LIVE).fetchall()
        jobs = [_job(r) for r in rows]
        for job in jobs:
            if job.state is JobState.QUEUED:
                job.queued_at = now
            else:
                job.reported_at = now
            self.save(job)
        return jobs

    def next_seq(self) -> int:
        """One past the highest sequence number ever stored (FIFO order survives restarts and purges)."""
        row = self._db.execute("SELECT MAX(seq) FROM jobs").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def purge(self, finished_before: float) -> int:
        """Delete finished jobs older than a time; returns how many went."""
        states = tuple(s.value for s in TERMINAL)
        cur = self._db.execute(
            f"DELETE FROM jobs WHERE state IN ({', '.join('?' * len(states))}) AND finished_at < ?",
            (*states, finished_before),
        )
        return cur.rowcount


def _row(job: Job) -> tuple[object, ...]:
    return (
        job.id,
        job.seq,
        job.tenant,
        job.model,
        job.priority,
        job.token,
        job.state.value,
        json.dumps(job.params),
        job.created_at,
        job.queued_at,
        job.started_at,
        job.finished_at,
        job.reported_at,
        job.error,
        job.tokens,
    )


def _job(row: tuple[object, ...]) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["state"] = JobState(values["state"])
    values["params"] = json.loads(str(values["params"]))
    return Job(**values)  # type: ignore[arg-type]
