"""Jobs in a real SQLite file: saved, reopened, and what a coordinator crash leaves behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from engine.coordinator.jobs import Job, JobQueue, JobState, QueueLimits, Submission
from engine.coordinator.jobstore import JobStore
from engine.coordinator.registry import Registry


def always(_: str) -> bool:
    return True


def test_saved_jobs_read_back_field_for_field(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "coord.sqlite3")
    q = JobQueue(QueueLimits())
    job = q.submit(Submission("acme", "m", 7, {"prompt": "hi", "n": [1, 2]}), "job-1", "secret", 10.0)
    store.save(job)
    q.dispatch(always, 11.0)
    q.report(job.id, JobState.FAILED, 12.0, tokens=3, error="boom")
    store.save(job)
    back = store.get("job-1")
    assert back == job
    assert back is not job and back.params == {"prompt": "hi", "n": [1, 2]}
    assert store.get("missing") is None
    store.close()


def test_reopen_restores_queued_and_running_jobs_with_fresh_windows(tmp_path: Path) -> None:
    path = tmp_path / "coord.sqlite3"
    store = JobStore(path)
    q = JobQueue(QueueLimits(max_running_per_model=1))
    running, queued, done = (q.submit(Submission("a", "m"), f"job-{i}", "t", 1.0) for i in range(3))
    q.dispatch(always, 2.0)
    q.cancel(done.id, 3.0)
    for job in (running, queued, done):
        store.save(job)
    store.close()

    reopened = JobStore(path)
    live = reopened.load_live(now=500.0)
    assert [(j.id, j.state) for j in live] == [(running.id, JobState.RUNNING), (queued.id, JobState.QUEUED)]
    back_running, back_queued = live
    assert (back_running.started_at, back_running.reported_at) == (2.0, 500.0)  # a fresh lease
    assert (back_queued.created_at, back_queued.queued_at) == (1.0, 500.0)  # a fresh queue window
    assert reopened.get(done.id).state is JobState.CANCELLED
    assert reopened.get(queued.id).queued_at == 500.0  # the fresh windows are stored too
    assert reopened.next_seq() == 3
    restored = JobQueue(QueueLimits(lease_s=60), live, reopened.next_seq())
    assert restored.expire(always, 559.0) == []
    assert restored.expire(always, 561.0) == [back_running]  # its runner never came back
    reopened.close()


def test_a_killed_coordinator_loses_no_acknowledged_job(tmp_path: Path) -> None:
    path = tmp_path / "coord.sqlite3"
    script = textwrap.dedent(
        f"""
        import os
        from engine.coordinator.jobs import JobQueue, QueueLimits, Submission
        from engine.coordinator.jobstore import JobStore

        store = JobStore({str(path)!r})
        q = JobQueue(QueueLimits())
        for i in range(5):
            store.save(q.submit(Submission("t", "m", i), f"job-{{i}}", "tok", float(i)))
        os._exit(9)  # no close, no checkpoint: as if killed
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], timeout=60)
    assert proc.returncode == 9
    store = JobStore(path)
    live = store.load_live(now=100.0)
    assert [(j.id, j.priority, j.state) for j in live] == [(f"job-{i}", i, JobState.QUEUED) for i in range(5)]
    store.close()


def test_history_and_purge(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "coord.sqlite3")
    q = JobQueue(QueueLimits())
    jobs: list[Job] = []
    for i, tenant in enumerate(["a", "b", "a", "a"]):
        job = q.submit(Submission(tenant, "m"), f"job-{i}", "t", float(i))
        jobs.append(job)
    q.cancel("job-0", 10.0)
    q.cancel("job-1", 20.0)
    for job in jobs:
        store.save(job)
    assert [j.id for j in store.history("a", limit=2)] == ["job-2", "job-3"]
    assert [j.id for j in store.history()] == ["job-0", "job-1", "job-2", "job-3"]
    assert store.purge(finished_before=15.0) == 1  # only the finished job-0; queued ones never go
    assert [j.id for j in store.history()] == ["job-1", "job-2", "job-3"]
    assert store.next_seq() == 4
    store.close()


def test_shares_the_registry_database_file(tmp_path: Path) -> None:
    path = tmp_path / "coord.sqlite3"
    registry = Registry(path)
    store = JobStore(path)
    registry.add_node("n-1", "node-1")
    store.save(JobQueue(QueueLimits()).submit(Submission("a", "m"), "job-1", "t", 1.0))
    assert [n.name for n in registry.online_nodes()] == ["node-1"]
    assert store.get("job-1") is not None
    store.close()
    registry.close()
