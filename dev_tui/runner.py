"""Run one ``LocalJob`` in this process: queue it at the coordinator, then generate through a route.

This is ``kluster generate``'s path (``JobTicket`` + ``RemotePipeline`` + ``generate_events``),
driven from a Textual worker on the app's event loop, so tokens, per-hop timings and failovers
reach the job's state as they happen instead of through a log. The engine's client modules import
torch (seconds), so they are imported in a thread: the UI keeps drawing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from engine.errors import KlusterError

from .api import engine_session_auth
from .config import TuiConfig
from .localjobs import ROUTE_WAIT_S, LocalJob

log = logging.getLogger(__name__)

#: how often a running job checks whether its client switched routes
ROUTE_POLL_S = 0.1

_CLIENT_MODULES = ("engine.client.generation", "engine.client.jobs", "engine.client.remote", "engine.models.tokenizer")


def _import_client() -> dict[str, ModuleType]:
    return {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in _CLIENT_MODULES}


async def import_client() -> dict[str, ModuleType]:
    """The engine's client modules, imported off the event loop (torch takes a few seconds to load)."""
    return await asyncio.to_thread(_import_client)


class _Observed:
    """A pipeline wrapper that shows the job each step's hop timings and failovers as they happen."""

    def __init__(self, inner: Any, job: LocalJob, clock: Callable[[], float]) -> None:
        self.inner, self.job, self.clock = inner, job, clock

    async def step(self, *args: Any, **kwargs: Any) -> Any:
        result = await self.inner.step(*args, **kwargs)
        for event in result.events:
            if event.get("event") == "failover":
                self.job.failover(event, self.clock())
        self.job.add_timings([(t.peer, t.queue_ms, t.compute_ms) for t in result.timings])
        return result

    async def close_session(self, session: str) -> None:
        await self.inner.close_session(session)

    def pending_rewind(self, session: str) -> int | None:
        """A failed spot check's rewind (``generate_events`` asks before each step)."""
        return self.inner.pending_rewind(session)  # type: ignore[no-any-return]

    async def settle(self, session: str) -> None:
        await self.inner.settle(session)

    def summary(self) -> dict[str, Any]:
        return dict(self.inner.summary())


async def run_job(job: LocalJob, config: TuiConfig, cache_dir: Path, clock: Callable[[], float] = time.time) -> None:
    """Queue, wait for the slot, generate; the outcome lands in ``job`` (never raised, except cancellation).

    With a token, the job has sessions of its own (``SessionAuth``): a session opens one WebSocket
    only, so jobs of a batch starting together must not share one.
    """
    spec = job.spec
    auth = engine_session_auth(config.coordinator, config.token)
    try:
        mods = await import_client()
        ticket_cls = mods["jobs"].JobTicket
        extra = {"auth": auth} if auth is not None else {}
        async with ticket_cls(
            config.coordinator,
            spec.model,
            tenant=config.tenant,
            priority=spec.priority,
            params=spec.params(),
            wait_for_route=spec.wait_for_route,
            **extra,
        ) as ticket:
            job.job_id = ticket.id
            job.log(clock(), f"submitted as {ticket.id}")

            def queued(view: dict[str, Any]) -> None:
                job.set_state("queued", clock(), position=view.get("position"))
                job.log(clock(), f"queued, position {view.get('position')}")

            await ticket.wait_turn(queued)
            job.set_state("running", clock())
            await _generate(job, mods, config.coordinator, ticket, cache_dir, clock, extra)
    except asyncio.CancelledError:
        job.set_state("cancelled", clock())
        job.log(clock(), "cancelled", "warn")
        raise
    except KlusterError as exc:
        job.set_state("failed", clock(), error=str(exc))
        job.log(clock(), f"failed: {exc}", "error")
    except Exception as exc:  # a bug: keep the UI alive, say so, keep the traceback in the log file
        log.exception("job %s crashed", job.id)
        job.set_state("failed", clock(), error=f"internal error: {type(exc).__name__}: {exc}")
        job.log(clock(), f"internal error: {exc}", "error")
    finally:
        if auth is not None:
            await auth.close()


async def _generate(
    job: LocalJob,
    mods: dict[str, ModuleType],
    coordinator: str,
    ticket: Any,
    cache_dir: Path,
    clock: Callable[[], float],
    extra: dict[str, Any],
) -> None:
    from engine.models.sampling import SamplingParams

    spec = job.spec
    pipeline = mods["remote"].RemotePipeline(
        coordinator,
        spec.model,
        activation=spec.activation,
        name="kluster-tui",
        route_wait_s=ROUTE_WAIT_S,
        spot_check=spec.spot_check,
        **extra,
    )
    try:
        await pipeline.start()
        job.set_route(pipeline.route_event()["nodes"])
        job.log(clock(), "route: " + " -> ".join(h.name for h in job.route))
        folder = await pipeline.fetch_tokenizer(cache_dir)
        tokenizer = await asyncio.to_thread(mods["tokenizer"].ModelTokenizer, folder)
        text = tokenizer.render_chat([{"role": "user", "content": job.prompt}]) if spec.chat else job.prompt
        request = mods["generation"].GenerationRequest(
            prompt_ids=tokenizer.encode(text),
            max_new_tokens=spec.max_new_tokens,
            sampling=SamplingParams(spec.temperature, spec.top_p, spec.seed),
            stop_ids=tokenizer.stop_ids,
        )
        observed = _Observed(pipeline, job, clock)
        watcher = asyncio.create_task(_watch_route(pipeline, job, clock), name=f"route-{job.key}")
        try:
            async for event in mods["generation"].generate_events(observed, tokenizer, request):
                if event["event"] == "token":
                    job.add_token(str(event["text"]), clock())
                    ticket.tokens = job.tokens
                elif event["event"] == "rewind":
                    job.rewind(str(event["text"]), int(event["to_token"]), clock())
                    ticket.tokens = job.tokens
                elif event["event"] == "spot_check":
                    who = ", ".join([*event["guilty"], *event["disputed"]]) or "a node"
                    job.log(clock(), f"spot check failed: {who} returned wrong work", "error")
                elif event["event"] == "done":
                    job.done(event, clock())
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    finally:
        await pipeline.shutdown()


async def _watch_route(pipeline: Any, job: LocalJob, clock: Callable[[], float]) -> None:
    """Show a replacement route as soon as the client has one, before the replay on it ends."""
    while True:
        await asyncio.sleep(ROUTE_POLL_S)
        nodes = pipeline.route_event()["nodes"]
        if nodes and [n["peer_id"] for n in nodes] != [h.peer_id for h in job.route]:
            job.rerouting(nodes, clock())
