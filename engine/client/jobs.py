"""A client's place in the coordinator's job queue (see ``engine/coordinator/jobs_api.py``).

The coordinator admits and orders work; the client does the work (it drives generation through
the nodes). So a client submits a job, long-polls until the coordinator grants it a slot, keeps
the slot's lease alive with progress reports while it generates, and reports how it ended.
Going through the queue is what gives tenants fairness and the grid admission control: a job
that cannot start waits with a position, or fails with the coordinator's one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from engine.coordinator.auth import SessionAuth
from engine.errors import CoordinatorError, KlusterError, SessionError
from engine.transport.signaling import raise_for_error_body

log = logging.getLogger(__name__)

#: Longest single long-poll; the coordinator answers sooner when the job's state changes.
POLL_S = 30.0
#: Progress reports while running keep the slot's lease (60 s at the coordinator by default).
REPORT_S = 15.0


async def _call(
    session: aiohttp.ClientSession, method: str, base: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """One JSON request to the job API; error bodies become typed one-line errors."""
    url = base + path
    try:
        async with session.request(method, url, json=body) as resp:
            data = await resp.json(content_type=None)
    except aiohttp.ClientConnectionError as exc:
        raise CoordinatorError(f"cannot reach the coordinator at {base}: {exc}") from None
    except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
        raise CoordinatorError(f"job request {url} failed: {exc or type(exc).__name__}") from None
    raise_for_error_body(resp.status, data)
    if not isinstance(data, dict):
        raise CoordinatorError(f"job request {url} returned no JSON object")
    return data


class JobTicket:
    """One job: ``async with JobTicket(...) as job: await job.wait_turn(); ...; job.tokens = n``.

    Leaving the block reports ``done`` (or ``failed`` with the error's message); a cancelled
    block (Ctrl-C) cancels the job, so no slot is held by a client that went away.
    """

    def __init__(
        self,
        coordinator: str,
        model: str,
        *,
        tenant: str = "default",
        priority: int = 5,
        params: dict[str, Any] | None = None,
        wait_for_route: bool = False,
        auth: SessionAuth | None = None,
    ) -> None:
        self.base = coordinator.rstrip("/")
        #: our developer account's sessions (None: the coordinator runs with auth off); the caller owns it
        self.auth = auth
        self.body: dict[str, Any] = {
            "tenant": tenant,
            "model": model,
            "priority": priority,
            "params": params or {},
            # False: no route now is an error at once; True: queue until nodes serve the model
            "wait_for_route": wait_for_route,
        }
        self.job: dict[str, Any] = {}
        self.tokens = 0
        self._token = ""
        self._session: aiohttp.ClientSession | None = None
        self._lease: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return str(self.job.get("id", ""))

    async def __aenter__(self) -> JobTicket:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=POLL_S + 15, connect=10),
            middlewares=(self.auth.middleware,) if self.auth is not None else (),  # a session on each request
        )
        try:
            self.job = await _call(self._session, "POST", self.base, "/v1/jobs", self.body)
        except BaseException:
            await self._session.close()
            raise
        self._token = str(self.job.get("token", ""))
        return self

    async def wait_turn(self, on_queued: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Wait until the coordinator grants the slot; ``on_queued(job)`` hears each position change.

        Raises the coordinator's reason if the job fails or is cancelled while queued (e.g. no
        route for the model within the queue timeout): a wait never hangs.
        """
        if self._session is None:
            raise CoordinatorError("job not submitted")
        seen: Any = None
        while self.job.get("state") == "queued":
            if on_queued is not None and self.job.get("position") != seen:
                seen = self.job.get("position")
                on_queued(self.job)
            path = f"/v1/jobs/{self.id}/wait?state=queued&timeout={POLL_S:g}"
            self.job = await _call(self._session, "GET", self.base, path)
        if self.job.get("state") != "running":
            raise SessionError(f"job {self.id} {self.job.get('state')}: {self.job.get('error') or 'it did not start'}")
        self._lease = asyncio.create_task(self._keep_lease(), name=f"lease-{self.id}")

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(REPORT_S)
            try:
                await self._report("running")
            except KlusterError as exc:  # cancelled by its owner elsewhere, or the coordinator is away
                log.warning("job %s: progress report failed: %s", self.id, exc)

    async def _report(self, state: str, error: str | None = None) -> None:
        if self._session is None:
            return
        body: dict[str, Any] = {"token": self._token, "state": state, "tokens": self.tokens}
        if error is not None:
            body["error"] = error[:500]
        self.job = await _call(self._session, "POST", self.base, f"/v1/jobs/{self.id}/state", body)

    async def _cancel(self) -> None:
        if self._session is not None:
            path = f"/v1/jobs/{self.id}/cancel"
            self.job = await _call(self._session, "POST", self.base, path, {"token": self._token})

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._lease is not None:
            self._lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease
        try:
            with contextlib.suppress(KlusterError):  # the outcome is the caller's; this is bookkeeping
                if self.job.get("state") == "running":
                    if exc is None:
                        await self._report("done")
                    elif isinstance(exc, Exception):
                        await self._report("failed", str(exc) or type(exc).__name__)
                    else:  # cancelled or interrupted: give the slot back
                        await self._cancel()
                elif self.job.get("state") == "queued":
                    await self._cancel()
        finally:
            if self._session is not None:
                await self._session.close()
