"""The coordinator's multi-tenant job queue: pure decisions, no I/O, no clock of its own.

In Kluster the *client* drives generation through nodes over WebRTC; the coordinator never sees
activations. So a job here is a ticket for admission and fairness: a client submits, waits until the
queue grants it a slot (``running``), generates, and reports ``done`` or ``failed``. The queue
decides who goes next:

* strict priority (0-9, higher first);
* among equal priority, the tenant served least recently goes first (round robin over tenants),
  FIFO within a tenant, so a tenant with 100 queued jobs cannot starve one that submits 5 later;
* a job only starts when its model has a route, its tenant is under ``max_running_per_tenant``
  and its model under ``max_running_per_model``.

Nothing waits forever: a queued job that gets no slot within ``queue_timeout_s`` fails with a
message naming why, and a running job whose runner stops reporting for ``lease_s`` fails too
(its slot would otherwise be held by a crashed client). Every method takes ``now`` so tests
drive time by hand.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engine.errors import (
    ConfigError,
    JobNotFoundError,
    JobStateError,
    ModelNotFoundError,
    QueueFullError,
)

MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 9, 5
#: largest opaque ``params`` object a job may carry (JSON bytes); the coordinator never reads it
MAX_PARAMS_BYTES = 16 * 1024
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")




class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

#: running -> running is a runner's progress report (it refreshes the lease)
_ALLOWED: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
}


@dataclass(frozen=True)
class QueueLimits:
    """Admission and concurrency limits; the defaults suit a small grid."""

    max_queued_total: int = 1000
    max_queued_per_tenant: int = 100
    max_running_per_tenant: int = 2
    #: concurrent sessions one model's route is trusted to carry (nodes refuse beyond their memory)
    max_running_per_model: int = 16
    #: a queued job with no slot after this long fails (never an endless wait)
    queue_timeout_s: float = 300.0
    #: a running job whose runner has not reported for this long fails and frees its slot
    lease_s: float = 60.0
    #: finished jobs stay in memory (lists, waits) this long, at most ``retain_max`` of them;
    #: the store keeps them longer
    retain_s: float = 3600.0
    retain_max: int = 1000


DEFAULT_LIMITS = QueueLimits()


@dataclass(frozen=True)
class Submission:
    """A validated submit request."""

    tenant: str
    model: str
    priority: int = DEFAULT_PRIORITY
    params: dict[str, Any] = field(default_factory=dict)
    #: False: refuse at once (NoRouteError) instead of queueing when the model has no route now
    wait_for_route: bool = True


@dataclass
class Job:
    id: str
    tenant: str
    model: str
    priority: int
    #: FIFO order across the whole queue (ids are random)
    seq: int
    #: proof that a caller is the submitter: required to cancel or report (never listed)
    token: str
    created_at: float
    #: when the queue-timeout clock started (submit, or a coordinator restart)
    queued_at: float
    params: dict[str, Any] = field(default_factory=dict)
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    #: the runner's last report (or the grant, or a restart): the lease counts from here
    reported_at: float | None = None
    error: str | None = None
    tokens: int = 0

    def to_json(self, position: int | None = None, with_params: bool = True) -> dict[str, Any]:
        """The public view (no token): what lists, waits and events show."""
        out: dict[str, Any] = {
            "id": self.id,
            "tenant": self.tenant,
            "model": self.model,
            "priority": self.priority,
            "state": self.state.value,
            "position": position if self.state is JobState.QUEUED else None,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "tokens": self.tokens,
        }
        if with_params:
            out["params"] = self.params
        return out


def validate_submission(body: Any, is_served: Callable[[str], bool]) -> Submission:
    """Check a submit request body; a user mistake raises a one-line ConfigError or ModelNotFoundError."""
    if not isinstance(body, dict):
        raise ConfigError("a job must be a JSON object with 'tenant' and 'model'")
    tenant, model = body.get("tenant"), body.get("model")
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise ConfigError("'tenant' must be 1-64 characters: letters, digits, '_', '.', '@' or '-'")
    if not isinstance(model, str) or not model:
        raise ConfigError("'model' must be a non-empty string")
    if not is_served(model):
        raise ModelNotFoundError(f"model '{model}' is not served here")
    priority = body.get("priority", DEFAULT_PRIORITY)
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ConfigError(f"'priority' must be an integer {MIN_PRIORITY}-{MAX_PRIORITY} (higher runs first)")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError("'params' must be a JSON object")
    if len(json.dumps(params)) > MAX_PARAMS_BYTES:
        raise ConfigError(f"'params' is larger than {MAX_PARAMS_BYTES} bytes")
    wait = body.get("wait_for_route", True)
    if not isinstance(wait, bool):
        raise ConfigError("'wait_for_route' must be true or false")
    return Submission(tenant, model, priority, params, wait)


def one_line(text: str, limit: int = 500) -> str:
    """A runner-supplied error as one bounded line (it is shown in lists and the TUI)."""
    return " ".join(text.split())[:limit]


class JobQueue:
    """All live jobs (queued, running, recently finished) and the fairness state between tenants."""

    def __init__(self, limits: QueueLimits, jobs: Iterable[Job] = (), next_seq: int = 0) -> None:
        """``jobs`` restores live jobs after a restart; ``next_seq`` keeps FIFO numbers growing across runs."""
        self.limits = limits
        self._jobs: dict[str, Job] = {}
        #: tenant -> the grant counter value when it last got a slot (absent: never served)
        self._served: dict[str, int] = {}
        self._grants = 0
        self._seq = next_seq
        for job in jobs:
            self._jobs[job.id] = job
            self._seq = max(self._seq, job.seq + 1)

    # -------------------------------------------------------------- reading

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job '{job_id}'")
        return job

    def find(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self, tenant: str | None = None) -> list[Job]:
        """Live jobs in submission order, optionally one tenant's."""
        return sorted((j for j in self._jobs.values() if tenant is None or j.tenant == tenant), key=lambda j: j.seq)

    def _queued(self) -> list[Job]:
        return sorted((j for j in self._jobs.values() if j.state is JobState.QUEUED), key=lambda j: j.seq)

    def _running(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.state is JobState.RUNNING]

    def positions(self) -> dict[str, int]:
        """Each queued job's place in line (1 = next), as the queue stands now.

        This replays the pick rule of ``next_runnable`` ignoring routes and running limits, so it is
        exact when every model has a route and slots free one at a time; a later higher-priority
        job can still overtake (that is what priority means).
        """
        served = dict(self._served)
        tick = self._grants
        by_priority: dict[int, dict[str, list[Job]]] = defaultdict(lambda: defaultdict(list))
        for job in self._queued():
            by_priority[job.priority][job.tenant].append(job)
        out: dict[str, int] = {}
        for priority in sorted(by_priority, reverse=True):
            lines = by_priority[priority]
            order = sorted(lines, key=lambda t: (served.get(t, -1), lines[t][0].seq))
            for round_ in range(max(len(v) for v in lines.values())):
                for tenant in order:
                    if round_ < len(lines[tenant]):
                        out[lines[tenant][round_].id] = len(out) + 1
                        served[tenant] = tick
                        tick += 1
        return out

    # ------------------------------------------------------------ admission

    def submit(self, sub: Submission, job_id: str, token: str, now: float) -> Job:
        """Admit a job as queued, or raise QueueFullError with what limit was hit."""
        queued = self._queued()
        mine = sum(j.tenant == sub.tenant for j in queued)
        if mine >= self.limits.max_queued_per_tenant:
            raise QueueFullError(
                f"tenant '{sub.tenant}' already has {mine} queued jobs (limit {self.limits.max_queued_per_tenant}); "
                "wait for some to finish"
            )
        if len(queued) >= self.limits.max_queued_total:
            raise QueueFullError(f"the job queue is full ({len(queued)} jobs queued); try again later")
        if job_id in self._jobs:
            raise JobStateError(f"job id '{job_id}' is already taken")
        job = Job(
            id=job_id,
            tenant=sub.tenant,
            model=sub.model,
            priority=sub.priority,
            seq=self._seq,
            token=token,
            created_at=now,
            queued_at=now,
            params=dict(sub.params),
        )
        self._seq += 1
        self._jobs[job.id] = job
        return job

    # ----------------------------------------------------------- scheduling

    def next_runnable(self, has_route: Callable[[str], bool]) -> Job | None:
        """The queued job to start next, or None: priority, then least recently served tenant, then FIFO."""
        running = self._running()
        per_tenant = Counter(j.tenant for j in running)
        per_model = Counter(j.model for j in running)
        routes: dict[str, bool] = {}
        best: Job | None = None
        best_key: tuple[int, int, int] | None = None
        for job in self._queued():
            if per_tenant[job.tenant] >= self.limits.max_running_per_tenant:
                continue
            if per_model[job.model] >= self.limits.max_running_per_model:
                continue
            if job.model not in routes:
                routes[job.model] = has_route(job.model)
            if not routes[job.model]:
                continue
            key = (-job.priority, self._served.get(job.tenant, -1), job.seq)
            if best_key is None or key < best_key:
                best, best_key = job, key
        return best

    def start(self, job_id: str, now: float) -> Job:
        """Grant a queued job its slot (queued -> running)."""
        job = self.get(job_id)
        _check(job, JobState.RUNNING)
        if job.state is not JobState.QUEUED:
            raise JobStateError(f"job '{job_id}' is already running")
        job.state, job.started_at, job.reported_at = JobState.RUNNING, now, now
        self._served[job.tenant] = self._grants
        self._grants += 1
        return job

    def dispatch(self, has_route: Callable[[str], bool], now: float) -> list[Job]:
        """Start every job that can start now; returns them in grant order."""
        routes: dict[str, bool] = {}

        def cached(model: str) -> bool:
            if model not in routes:
                routes[model] = has_route(model)
            return routes[model]

        started = []
        while (job := self.next_runnable(cached)) is not None:
            started.append(self.start(job.id, now))
        return started

    # ---------------------------------------------------------- transitions

    def report(
        self, job_id: str, state: JobState, now: float, tokens: int | None = None, error: str | None = None
    ) -> Job:
        """The runner's report: running (progress, renews the lease), done or failed."""
        job = self.get(job_id)
        if state not in (JobState.RUNNING, JobState.DONE, JobState.FAILED):
            raise JobStateError(f"a runner can report running, done or failed, not {state.value}")
        if job.state is JobState.QUEUED:
            raise JobStateError(f"job '{job_id}' is still queued: wait until the coordinator grants it a slot")
        _check(job, state)
        if tokens is not None:
            job.tokens = tokens
        job.reported_at = now
        if state is not JobState.RUNNING:
            job.state, job.finished_at = state, now
            if state is JobState.FAILED:
                job.error = one_line(error or "the runner reported a failure")
        return job

    def cancel(self, job_id: str, now: float) -> Job:
        """Cancel a queued or running job; a runner learns it from its next report or wait."""
        job = self.get(job_id)
        _check(job, JobState.CANCELLED)
        job.state, job.finished_at = JobState.CANCELLED, now
        return job

    def expire(self, has_route: Callable[[str], bool], now: float) -> list[Job]:
        """Fail queued jobs past the queue timeout and running jobs whose lease ran out."""
        out = []
        for job in list(self._jobs.values()):
            if job.state is JobState.QUEUED and now - job.queued_at > self.limits.queue_timeout_s:
                wait = f"{self.limits.queue_timeout_s:g} s"
                if has_route(job.model):
                    job.error = f"no free slot for model '{job.model}' within {wait}: the grid is busy, try again later"
                else:
                    job.error = f"no route for model '{job.model}' within {wait}: not enough live nodes serve it"
            elif job.state is JobState.RUNNING and now - (job.reported_at or 0.0) > self.limits.lease_s:
                job.error = f"the runner stopped reporting for {self.limits.lease_s:g} s"
            else:
                continue
            job.state, job.finished_at = JobState.FAILED, now
            out.append(job)
        return out

    def prune(self, now: float) -> list[Job]:
        """Forget finished jobs older than ``retain_s`` or beyond the newest ``retain_max`` (the store has them).

        Every decision scans the live jobs, so this bound keeps each one cheap however busy the grid was.
        """

        def ended(job: Job) -> float:
            return now if job.finished_at is None else job.finished_at

        finished = sorted((j for j in self._jobs.values() if j.state in TERMINAL), key=ended)
        excess = max(0, len(finished) - self.limits.retain_max)
        old = [j for i, j in enumerate(finished) if i < excess or now - ended(j) > self.limits.retain_s]
        for job in old:
            del self._jobs[job.id]
        return old


def _check(job: Job, to: JobState) -> None:
    if to not in _ALLOWED.get(job.state, frozenset()):
        raise JobStateError(f"job '{job.id}' is {job.state.value}; it cannot become {to.value}")
