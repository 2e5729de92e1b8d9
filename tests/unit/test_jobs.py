"""The job queue's pure decisions (priority, fairness, admission, transitions, timeouts) and the event hub."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from engine.coordinator.events import JOB_QUEUED, NODE_JOINED, STREAM_DROPPED, EventHub
from engine.coordinator.jobs import (
    Job,
    JobQueue,
    JobState,
    QueueLimits,
    Submission,
    validate_submission,
)
from engine.errors import (
    CapacityError,
    ConfigError,
    JobNotFoundError,
    JobStateError,
    ModelNotFoundError,
    QueueFullError,
)


def always(_: str) -> bool:
    return True


class Ids:
    """Sequential job ids, so failures name readable jobs."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"j{self.n}"


def submit(q: JobQueue, ids: Ids, tenant: str, n: int = 1, priority: int = 5, model: str = "m", now: float = 0.0):
    return [q.submit(Submission(tenant, model, priority), ids(), "tok", now) for _ in range(n)]


def one_slot() -> QueueLimits:
    """One job at a time: the order jobs start in is the queue's pick order."""
    return QueueLimits(max_running_per_model=1, max_running_per_tenant=1, max_queued_per_tenant=1000)


def run_one(q: JobQueue, now: float = 0.0, has_route: Callable[[str], bool] = always) -> Job | None:
    """Grant the next slot and finish that job at once."""
    started = q.dispatch(has_route, now)
    if not started:
        return None
    (job,) = started
    q.report(job.id, JobState.DONE, now)
    return job


# ---------------------------------------------------------------- validation


def test_validate_submission_accepts_defaults_and_refuses_mistakes() -> None:
    served = {"m"}.__contains__
    sub = validate_submission({"tenant": "acme", "model": "m"}, served)
    assert (sub.priority, sub.params, sub.wait_for_route) == (5, {}, True)
    for body, message in [
        ([], "JSON object"),
        ({"model": "m"}, "'tenant'"),
        ({"tenant": "a b", "model": "m"}, "'tenant'"),
        ({"tenant": "a", "model": ""}, "'model'"),
        ({"tenant": "a", "model": "m", "priority": 10}, "'priority' must be an integer 0-9"),
        ({"tenant": "a", "model": "m", "priority": True}, "'priority'"),
        ({"tenant": "a", "model": "m", "params": [1]}, "'params' must be a JSON object"),
        ({"tenant": "a", "model": "m", "params": {"x": "y" * 20000}}, "larger than"),
        ({"tenant": "a", "model": "m", "wait_for_route": "no"}, "'wait_for_route'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_submission(body, served)
    with pytest.raises(ModelNotFoundError, match="model 'other' is not served here"):
        validate_submission({"tenant": "a", "model": "other"}, served)


# ------------------------------------------------------------------ ordering


def test_higher_priority_runs_first_then_fifo() -> None:
    q, ids = JobQueue(one_slot()), Ids()
    low = submit(q, ids, "a", 2, priority=1)
    high = submit(q, ids, "a", 2, priority=9)
    order = [run_one(q) for _ in range(4)]
    assert [j.id for j in order if j] == [high[0].id, high[1].id, low[0].id, low[1].id]
    assert run_one(q) is None


def test_a_late_small_tenant_is_not_starved_by_a_big_one() -> None:
    q, ids = JobQueue(one_slot()), Ids()
    submit(q, ids, "big", 100)
    assert run_one(q).tenant == "big"
    small = submit(q, ids, "small", 5)
    order = [run_one(q) for _ in range(10)]
    # the five small jobs take every other slot of the next ten
    assert [j.tenant for j in order] == ["small", "big"] * 5
    assert {j.id for j in order if j.tenant == "small"} == {j.id for j in small}


def test_tenants_of_equal_priority_share_slots_evenly_over_many_jobs() -> None:
    q, ids = JobQueue(one_slot()), Ids()
    rng = random.Random(7)
    for _ in range(300):
        submit(q, ids, rng.choice(["a", "b", "c"]))
    served: dict[str, int] = {"a": 0, "b": 0, "c": 0}
    for _ in range(60):  # every tenant still has plenty queued after 60 slots
        served[run_one(q).tenant] += 1
    assert served == {"a": 20, "b": 20, "c": 20}


def test_positions_predict_the_order_jobs_start_in() -> None:
    q, ids = JobQueue(one_slot()), Ids()
    rng = random.Random(3)
    for _ in range(3):  # some service history, so tenants start unequal
        submit(q, ids, rng.choice("abcd"), priority=rng.randint(0, 9))
        run_one(q)
    for _ in range(80):
        submit(q, ids, rng.choice("abcd"), priority=rng.choice([1, 5, 5, 9]))
    positions = q.positions()
    assert sorted(positions.values()) == list(range(1, 81))
    order = [run_one(q).id for _ in range(80)]
    assert order == sorted(positions, key=positions.__getitem__)


def test_per_tenant_and_per_model_running_limits() -> None:
    q, ids = JobQueue(QueueLimits(max_running_per_tenant=2, max_running_per_model=3)), Ids()
    submit(q, ids, "a", 5)
    submit(q, ids, "b", 5)
    submit(q, ids, "c", 1, model="other")
    started = q.dispatch(always, 0.0)
    assert sorted((j.tenant, j.model) for j in started) == [("a", "m"), ("a", "m"), ("b", "m"), ("c", "other")]
    assert q.dispatch(always, 0.0) == []  # model m is at its 3 slots
    q.report(started[0].id, JobState.DONE, 1.0)
    (nxt,) = q.dispatch(always, 1.0)
    assert (nxt.tenant, nxt.model) == ("b", "m")  # b was served longer ago than a


def test_jobs_without_a_route_wait_and_others_pass_them() -> None:
    q, ids = JobQueue(QueueLimits()), Ids()
    (blocked,) = submit(q, ids, "a", model="down", priority=9)
    (ok,) = submit(q, ids, "a", model="up", priority=1)
    up = {"up"}.__contains__
    assert q.dispatch(up, 0.0) == [ok]
    assert blocked.state is JobState.QUEUED and q.positions() == {blocked.id: 1}
    assert q.dispatch(always, 1.0) == [blocked]


# ----------------------------------------------------------------- admission


def test_admission_limits_per_tenant_and_overall() -> None:
    q, ids = JobQueue(QueueLimits(max_queued_per_tenant=2, max_queued_total=3)), Ids()
    submit(q, ids, "a", 2)
    with pytest.raises(QueueFullError, match="tenant 'a' already has 2 queued jobs \\(limit 2\\)"):
        submit(q, ids, "a")
    submit(q, ids, "b")
    with pytest.raises(CapacityError, match="the job queue is full \\(3 jobs queued\\)"):
        submit(q, ids, "c")
    q.dispatch(always, 0.0)  # running jobs no longer count as queued
    submit(q, ids, "c")


# --------------------------------------------------------------- transitions


def test_runner_transitions_and_illegal_ones() -> None:
    q, ids = JobQueue(QueueLimits()), Ids()
    (job,) = submit(q, ids, "a")
    with pytest.raises(JobStateError, match="still queued"):
        q.report(job.id, JobState.DONE, 1.0)
    q.dispatch(always, 2.0)
    assert (job.state, job.started_at) == (JobState.RUNNING, 2.0)
    q.report(job.id, JobState.RUNNING, 3.0, tokens=7)
    assert (job.tokens, job.reported_at) == (7, 3.0)
    q.report(job.id, JobState.FAILED, 4.0, tokens=9, error="node\nfell over")
    assert (job.state, job.finished_at, job.error, job.tokens) == (JobState.FAILED, 4.0, "node fell over", 9)
    with pytest.raises(JobStateError, match="is failed; it cannot become done"):
        q.report(job.id, JobState.DONE, 5.0)
    with pytest.raises(JobStateError, match="is failed; it cannot become cancelled"):
        q.cancel(job.id, 5.0)
    with pytest.raises(JobStateError, match="running, done or failed"):
        q.report(job.id, JobState.QUEUED, 5.0)
    with pytest.raises(JobNotFoundError, match="no job 'nope'"):
        q.get("nope")


def test_cancel_queued_and_running() -> None:
    q, ids = JobQueue(QueueLimits(max_running_per_model=1)), Ids()
    first, second = submit(q, ids, "a", 2)
    q.dispatch(always, 0.0)
    q.cancel(second.id, 1.0)
    assert (second.state, second.finished_at) == (JobState.CANCELLED, 1.0)
    assert q.positions() == {}
    q.cancel(first.id, 2.0)  # the slot frees at once; the runner learns on its next report
    with pytest.raises(JobStateError, match="is cancelled; it cannot become done"):
        q.report(first.id, JobState.DONE, 3.0)
    (third,) = submit(q, ids, "a")
    assert q.dispatch(always, 3.0) == [third]


# ------------------------------------------------------------------ timeouts


def test_queue_timeout_says_why_the_job_never_started() -> None:
    limits = QueueLimits(queue_timeout_s=10, max_running_per_model=1)
    q, ids = JobQueue(limits), Ids()
    (orphan,) = submit(q, ids, "a", model="down")
    hog, starved = submit(q, ids, "b", 2, model="up")
    up = {"up"}.__contains__
    q.dispatch(up, 0.0)
    q.report(hog.id, JobState.RUNNING, 9.0)
    assert q.expire(up, 10.0) == []  # not yet: exactly at the limit
    expired = q.expire(up, 10.5)
    assert {j.id for j in expired} == {orphan.id, starved.id}
    assert orphan.error == "no route for model 'down' within 10 s: not enough live nodes serve it"
    assert starved.error == "no free slot for model 'up' within 10 s: the grid is busy, try again later"
    assert (orphan.state, orphan.finished_at) == (JobState.FAILED, 10.5)
    assert hog.state is JobState.RUNNING


def test_running_job_fails_when_its_runner_stops_reporting() -> None:
    q, ids = JobQueue(QueueLimits(lease_s=30)), Ids()
    (job,) = submit(q, ids, "a")
    q.dispatch(always, 0.0)
    q.report(job.id, JobState.RUNNING, 20.0)
    assert q.expire(always, 50.0) == []
    assert q.expire(always, 50.5) == [job]
    assert job.error == "the runner stopped reporting for 30 s"


def test_finished_jobs_are_pruned_after_retention() -> None:
    q, ids = JobQueue(QueueLimits(retain_s=100)), Ids()
    done, waiting = submit(q, ids, "a", 2, now=0.0)
    q.cancel(done.id, 5.0)
    assert q.prune(105.0) == []
    assert q.prune(105.5) == [done]
    assert q.jobs() == [waiting]
    assert q.find(done.id) is None


def test_only_the_newest_finished_jobs_are_kept_in_memory() -> None:
    q, ids = JobQueue(QueueLimits(retain_max=2)), Ids()
    jobs = submit(q, ids, "a", 5)
    for t, job in enumerate(jobs[:4]):
        q.cancel(job.id, float(t))
    assert [j.id for j in q.prune(10.0)] == [jobs[0].id, jobs[1].id]
    assert q.jobs() == jobs[2:]


def test_restored_queue_keeps_fifo_numbers_growing() -> None:
    q, ids = JobQueue(QueueLimits()), Ids()
    old = submit(q, ids, "a", 2)
    restored = JobQueue(QueueLimits(), [old[1]], next_seq=old[1].seq + 1)
    (new,) = submit(restored, ids, "a")
    assert new.seq > old[1].seq
    assert restored.positions() == {old[1].id: 1, new.id: 2}


# ----------------------------------------------------------------- event hub


async def test_hub_delivers_events_in_order_with_seq() -> None:
    hub = EventHub(clock=lambda: 123.0)
    with hub.subscribe() as sub:
        hub.publish(JOB_QUEUED, job={"id": "j1"})
        hub.node_event(NODE_JOINED, "n-1", "node-1")
        first, second = await sub.next(1), await sub.next(1)
    assert first == {"kind": JOB_QUEUED, "seq": 1, "ts": 123.0, "job": {"id": "j1"}}
    assert (second["kind"], second["peer_id"], second["name"], second["seq"]) == (NODE_JOINED, "n-1", "node-1", 2)
    with pytest.raises(ValueError, match="unknown event kind"):
        hub.publish("job.exploded")


async def test_slow_subscriber_drops_oldest_and_is_told_how_many() -> None:
    hub = EventHub()
    with hub.subscribe(maxsize=3) as slow:
        for i in range(10):
            hub.publish(JOB_QUEUED, n=i)  # never blocks, however slow the subscriber
        notice = await slow.next(1)
        rest = [await slow.next(1) for _ in range(3)]
        assert (notice["kind"], notice["count"], slow.dropped) == (STREAM_DROPPED, 7, 7)
        assert [e["n"] for e in rest] == [7, 8, 9]
        assert await slow.next(0.01) is None  # a timeout, not a hang


async def test_reconnecting_subscriber_replays_from_history() -> None:
    hub = EventHub(history=4)
    for i in range(6):
        hub.publish(JOB_QUEUED, n=i)  # seq 1..6; history keeps 3..6
    with hub.subscribe(after=4) as sub:
        assert [(await sub.next(1))["seq"] for _ in range(2)] == [5, 6]
    with hub.subscribe(after=1) as sub:
        notice = await sub.next(1)
        assert (notice["kind"], notice["count"]) == (STREAM_DROPPED, 1)  # seq 2 is gone
        assert (await sub.next(1))["seq"] == 3


async def test_closing_the_hub_ends_waiting_subscribers() -> None:
    hub = EventHub()
    with hub.subscribe() as sub:
        waiter = asyncio.create_task(sub.next(None))
        await asyncio.sleep(0)
        hub.close()
        assert await asyncio.wait_for(waiter, 1) is None
        assert sub.closed
