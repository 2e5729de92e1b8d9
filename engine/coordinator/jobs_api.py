"""The coordinator's job HTTP API: the queue (``jobs.py``) + its store + the event hub, wired to routes.

How a client runs a job (the client generates; the coordinator only admits and orders):

1. ``POST /v1/jobs`` {tenant, model, priority?, params?, wait_for_route?} -> 202 with the job
   (``position`` in line) and a ``token``, the submitter's proof for cancel and reports;
2. ``GET /v1/jobs/{id}/wait?state=queued&timeout=30`` until the state is no longer ``queued``
   (a long poll: it returns at the first change or after ``timeout`` s, never hangs);
3. on ``running`` the slot is granted: generate through the nodes, posting
   ``POST /v1/jobs/{id}/state`` {token, state: running, tokens} at least every lease/3 seconds;
   a 409 ``bad_job_state`` answer means the job was cancelled (or expired): stop;
4. ``POST /v1/jobs/{id}/state`` {token, state: done|failed, tokens?, error?}.

With auth on (``engine.coordinator.auth``) every job route needs a developer session, and a job's
tenant is the developer's account name, whatever the body says (admins may name any tenant).

``GET /v1/jobs?tenant=`` lists live jobs, ``GET /v1/jobs/{id}`` shows one (also an old one, from the
store), ``POST /v1/jobs/{id}/cancel`` {token} cancels, and ``GET /v1/events`` streams job and node
events as Server-Sent Events (a ``: ping`` comment every ``heartbeat_s``).

Errors are ``{"error": {"code", "message"}}`` with the HTTP status the code implies, as in ``app.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from engine.coordinator import events
from engine.coordinator.accounts import ADMIN
from engine.coordinator.auth import ACCOUNT
from engine.coordinator.events import EventHub
from engine.coordinator.jobs import (
    DEFAULT_LIMITS,
    TERMINAL,
    Job,
    JobQueue,
    JobState,
    QueueLimits,
    validate_submission,
)
from engine.coordinator.jobstore import JobStore
from engine.errors import (
    ConfigError,
    JobNotFoundError,
    JobStateError,
    KlusterError,
    ModelNotFoundError,
    NoRouteError,
    QueueFullError,
)

log = logging.getLogger(__name__)

MAX_WAIT_S = 60.0
_STATUS: dict[type[KlusterError], int] = {
    ConfigError: 400,
    ModelNotFoundError: 404,
    JobNotFoundError: 404,
    JobStateError: 409,
    QueueFullError: 429,
    NoRouteError: 503,
}
_EVENT_FOR = {
    JobState.QUEUED: events.JOB_QUEUED,
    JobState.RUNNING: events.JOB_STARTED,
    JobState.DONE: events.JOB_DONE,
    JobState.FAILED: events.JOB_FAILED,
    JobState.CANCELLED: events.JOB_CANCELLED,
}


class JobService:
    """The queue's state kept in step with the store, the event hub and long-poll waiters."""

    def __init__(
        self,
        store: JobStore,
        hub: EventHub,
        is_served: Callable[[str], bool],
        has_route: Callable[[str], bool],
        limits: QueueLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.hub, self.limits = store, hub, limits
        self._is_served, self._has_route, self._clock = is_served, has_route, clock
        #: the served model ids, for error messages (set by add_job_routes)
        self.served: Callable[[], list[str]] = list
        next_seq = store.next_seq()
        self.queue = JobQueue(limits, store.load_live(clock()), next_seq)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        if restored := self.queue.jobs():
            log.info("restored %d unfinished jobs from the store", len(restored))

    # ------------------------------------------------------------ commands

    def submit(self, body: Any) -> Job:
        try:
            sub = validate_submission(body, self._is_served)
        except ModelNotFoundError as exc:  # say what is served, so the user can correct the name
            raise ModelNotFoundError(f"{exc} (served: {', '.join(self.served()) or 'none'})") from None
        if not sub.wait_for_route and not self._has_route(sub.model):
            raise NoRouteError(f"no route for model '{sub.model}' now: not enough live nodes serve it")
        job = self.queue.submit(sub, f"job-{secrets.token_hex(6)}", secrets.token_urlsafe(16), self._clock())
        self._changed([job])
        self.tick()  # it may start at once
        return job

    def cancel(self, job_id: str, token: Any) -> Job:
        job = self._owned(job_id, token)
        self._changed([self.queue.cancel(job.id, self._clock())])
        self.tick()  # a running slot may have freed
        return job

    def report(self, job_id: str, body: Any) -> Job:
        """A runner's state report: running (progress), done or failed."""
        if not isinstance(body, dict):
            raise ConfigError("a state report must be a JSON object with 'token' and 'state'")
        job = self._owned(job_id, body.get("token"))
        try:
            state = JobState(body.get("state"))
        except ValueError:
            raise ConfigError("'state' must be running, done or failed") from None
        tokens, error = body.get("tokens"), body.get("error")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise ConfigError("'tokens' must be a non-negative integer")
        if error is not None and not isinstance(error, str):
            raise ConfigError("'error' must be a string")
        before = job.state
        self.queue.report(job.id, state, self._clock(), tokens, error)
        if job.state is before:
            self.store.save(job)  # progress only: persist, but no event and no wake-up
        else:
            self._changed([job])
            self.tick()
        return job

    def tick(self) -> None:
        """Expire what waited too long, start what can start, forget old finished jobs."""
        now = self._clock()
        routes: dict[str, bool] = {}

        def has_route(model: str) -> bool:
            if model not in routes:
                routes[model] = self._has_route(model)
            return routes[model]

        self._changed(self.queue.expire(has_route, now))
        self._changed(self.queue.dispatch(has_route, now))
        self.queue.prune(now)

    # ------------------------------------------------------------- queries

    def get(self, job_id: str) -> Job:
        job = self.queue.find(job_id) or self.store.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job '{job_id}'")
        return job

    def view(self, job: Job, with_params: bool = True) -> dict[str, Any]:
        return job.to_json(self.queue.positions().get(job.id), with_params)

    def list_jobs(self, tenant: str | None) -> list[dict[str, Any]]:
        positions = self.queue.positions()
        return [j.to_json(positions.get(j.id)) for j in self.queue.jobs(tenant)]

    async def wait(self, job_id: str, state: str | None, timeout: float) -> Job:
        """Return once the job's state differs from ``state`` (default: its state now), or after ``timeout``."""
        job = self.get(job_id)
        if state is not None and state not in {s.value for s in JobState}:
            raise ConfigError(f"'state' must be one of {', '.join(s.value for s in JobState)}")
        awaited = JobState(state) if state is not None else job.state
        if job.state is not awaited or job.state in TERMINAL:
            return job
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(job.id, set())
        waiters.add(fut)
        try:
            await asyncio.wait({fut}, timeout=timeout)
        finally:
            waiters.discard(fut)
            if not waiters:
                self._waiters.pop(job.id, None)
        return self.get(job_id)

    def shutdown(self) -> None:
        """Answer every long poll now (the coordinator is stopping)."""
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def run_ticker(self, interval_s: float) -> None:
        """Tick forever: timeouts fire and routes that appeared get used even when nothing is posted."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.tick()
            except Exception:  # one bad tick must not stop the queue for good
                log.exception("job queue tick failed")

    # ------------------------------------------------------------- helpers

    def _owned(self, job_id: str, token: Any) -> Job:
        job = self.queue.find(job_id)
        if job is None:
            if self.store.get(job_id) is None:
                raise JobNotFoundError(f"no job '{job_id}'")
            raise JobStateError(f"job '{job_id}' finished long ago")
        if not isinstance(token, str) or not secrets.compare_digest(token, job.token):
            raise ConfigError(f"'token' does not match job '{job_id}' (use the token its submit answered)")
        return job

    def _changed(self, jobs: list[Job]) -> None:
        """Persist, announce and wake waiters for jobs whose state just changed."""
        if not jobs:
            return
        positions = self.queue.positions()
        for job in jobs:
            self.store.save(job)
            self.hub.publish(_EVENT_FOR[job.state], job=job.to_json(positions.get(job.id), with_params=False))
            for fut in self._waiters.get(job.id, ()):
                if not fut.done():
                    fut.set_result(None)
            log.info("job %s (%s, %s) %s", job.id, job.tenant, job.model, job.state.value)


# ------------------------------------------------------------------ HTTP


def error_response(err: KlusterError) -> web.Response:
    status = next((s for cls, s in _STATUS.items() if isinstance(err, cls)), 500)
    return web.json_response({"error": {"code": err.code, "message": str(err)}}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _errors_as_json(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except KlusterError as exc:
            return error_response(exc)

    return wrapped


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ConfigError("the request body is not valid JSON") from None


def _float_query(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise ConfigError(f"'{name}' must be a number of seconds {low:g}-{high:g}")
    return value


def sse_frame(event: dict[str, Any]) -> bytes:
    """One Server-Sent Event (``json.dumps`` output has no newline, so one data line suffices)."""
    head = f"id: {event['seq']}\n" if "seq" in event else ""
    return f"{head}event: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode()


def add_job_routes(
    app: web.Application,
    *,
    db_path: str,
    hub: EventHub,
    is_served: Callable[[str], bool],
    has_route: Callable[[str], bool],
    served: Callable[[], list[str]] = list,
    limits: QueueLimits = DEFAULT_LIMITS,
    tick_s: float = 1.0,
    heartbeat_s: float = 15.0,
    clock: Callable[[], float] = time.time,
) -> JobService:
    """Register the job and event routes on ``app``; the store opens now and closes with the app.

    ``is_served(model)``: the coordinator serves this model at all (else 404 at submit);
    ``has_route(model)``: live nodes cover it now (jobs only start then; called once per model per tick).
    """
    service = JobService(JobStore(db_path), hub, is_served, has_route, limits, clock)
    service.served = served

    async def submit(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        account = request.get(ACCOUNT)
        if account is not None and account.role != ADMIN and isinstance(body, dict):
            body = {**body, "tenant": account.sub}  # with auth on, a developer queues as itself
        job = service.submit(body)
        return web.json_response({**service.view(job), "token": job.token}, status=202)

    async def list_jobs(request: web.Request) -> web.StreamResponse:
        return web.json_response({"jobs": service.list_jobs(request.query.get("tenant") or None)})

    async def get_job(request: web.Request) -> web.StreamResponse:
        return web.json_response(service.view(service.get(request.match_info["id"])))

    async def cancel(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request) if request.can_read_body else {}
        token = body.get("token") if isinstance(body, dict) else None
        return web.json_response(service.view(service.cancel(request.match_info["id"], token)))

    async def report(request: web.Request) -> web.StreamResponse:
        job = service.report(request.match_info["id"], await _json_body(request))
        return web.json_response(service.view(job))

    async def wait(request: web.Request) -> web.StreamResponse:
        timeout = _float_query(request, "timeout", 30.0, 0.0, MAX_WAIT_S)
        job = await service.wait(request.match_info["id"], request.query.get("state"), timeout)
        return web.json_response(service.view(job))

    async def stream(request: web.Request) -> web.StreamResponse:
        last = request.headers.get("Last-Event-ID", "")
        after = int(last) if last.isdigit() else None
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await resp.prepare(request)
        with hub.subscribe(after=after) as sub:
            try:
                await resp.write(b": connected\n\n")
                while True:
                    event = await sub.next(timeout=heartbeat_s)
                    if event is None and sub.closed:
                        break
                    await resp.write(sse_frame(event) if event is not None else b": ping\n\n")
            except ConnectionError:  # the watcher went away
                pass
        return resp

    app.router.add_post("/v1/jobs", _errors_as_json(submit))
    app.router.add_get("/v1/jobs", _errors_as_json(list_jobs))
    app.router.add_get("/v1/jobs/{id}", _errors_as_json(get_job))
    app.router.add_post("/v1/jobs/{id}/cancel", _errors_as_json(cancel))
    app.router.add_post("/v1/jobs/{id}/state", _errors_as_json(report))
    app.router.add_get("/v1/jobs/{id}/wait", _errors_as_json(wait))
    app.router.add_get("/v1/events", stream)

    async def background(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(service.run_ticker(tick_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        service.store.close()

    async def on_shutdown(_: web.Application) -> None:
        hub.close()  # ends SSE streams, so shutdown does not wait on them
        service.shutdown()

    app.cleanup_ctx.append(background)
    app.on_shutdown.append(on_shutdown)
    return service
