"""The generation loop shared by the local reference path and the distributed route.

A ``Pipeline`` turns "these tokens at this position" into the next sampled token; whether that
happens in this process or across three nodes is the pipeline's business. Keeping one loop for
both is what makes ``kluster generate --local`` a true reference for the distributed output.
Events are plain JSON-able dicts: they are exactly what ``--json`` prints.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.models.sampling import SamplingParams
from engine.models.tokenizer import ModelTokenizer, StreamDecoder
from engine.protocol.messages import HopTiming


@dataclass(frozen=True)
class StepResult:
    token_id: int
    timings: tuple[HopTiming, ...]
    wall_ms: float
    #: events that happened during the step (e.g. ``failover``), yielded before its token
    events: tuple[dict[str, Any], ...] = ()
    #: verify steps: the greedy token after each position fed (``token_id`` is the last)
    tokens: tuple[int, ...] = ()


class Pipeline(Protocol):
    """Something that can run a session's steps and sample the next token."""

    async def step(
        self,
        session: str,
        pos: int,
        tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> StepResult: ...

    async def close_session(self, session: str) -> None: ...


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()


def _hop_summary(all_timings: list[tuple[HopTiming, ...]]) -> list[dict[str, Any]]:
    """Mean queue/compute milliseconds per hop over the decode steps."""
    sums: dict[str, list[float]] = {}
    for timings in all_timings:
        for t in timings:
            acc = sums.setdefault(t.peer, [0.0, 0.0, 0.0])
            acc[0] += t.queue_ms
            acc[1] += t.compute_ms
            acc[2] += 1
    return [
        {"peer": peer, "queue_ms": round(q / n, 3), "compute_ms": round(c / n, 3)} for peer, (q, c, n) in sums.items()
    ]


def _pending_rewind(pipeline: Pipeline, session: str) -> int | None:
    """The position a failed spot check says to regenerate from, if the pipeline runs spot checks."""
    pending = getattr(pipeline, "pending_rewind", None)
    return pending(session) if pending is not None else None


async def generate_events(
    pipeline: Pipeline, tokenizer: ModelTokenizer, request: GenerationRequest
) -> AsyncIterator[dict[str, Any]]:
    """Yield a ``token`` event per generated token, then one ``done`` event with totals and timings."""
    session = uuid.uuid4().hex
    ids = list(request.prompt_ids)
    max_tokens = len(ids) + request.max_new_tokens
    stream = StreamDecoder(tokenizer)
    generated: list[int] = []
    decode_timings: list[tuple[HopTiming, ...]] = []
    prefill_ms = 0.0
    decode_wall = 0.0
    network_ms = 0.0
    network_steps = 0
    finish = "length"
    started = time.perf_counter()
    try:
        pos, feed = 0, ids
        settled = False  # the spot checks still running were waited for since the last step
        while True:
            rewind = _pending_rewind(pipeline, session)
            if rewind is not None and len(ids) + len(generated) > rewind:
                # a failed spot check: what comes from ``rewind`` on may be wrong; regenerate it
                keep = max(rewind, len(ids)) - len(ids)
                del generated[keep:]
                stream = StreamDecoder(tokenizer)
                for token in generated:
                    stream.push(token)
                full = ids + generated
                pos, feed = len(full) - 1, [full[-1]]
                yield {"event": "rewind", "to_token": keep, "text": tokenizer.decode(generated)}
                finish, settled = "length", False
                continue
            if len(generated) >= request.max_new_tokens or finish == "stop":
                if settled:
                    break
                # checks still running may yet find that part of the output must be regenerated
                settle = getattr(pipeline, "settle", None)
                if settle is not None:
                    await settle(session)
                settled = True
                continue
            index = len(generated)
            result = await pipeline.step(session, pos, feed, max_tokens, request.sampling, request.stop_ids)
            settled = False
            pos += len(feed)
            if index == 0:
                prefill_ms = result.wall_ms
            else:
                decode_wall += result.wall_ms
                decode_timings.append(result.timings)
            if index >= 2:
                # Not the first decode step: in ring mode its interval starts when token 0 reached
                # us, which can be well after the route already began step 1 (we were busy with the
                # prefill's reply), so it can be shorter than a whole cycle and the estimate < 0.
                network_ms += result.wall_ms - sum(t.compute_ms + t.queue_ms for t in result.timings)
                network_steps += 1
            generated.append(result.token_id)
            for event in result.events:
                yield event
            yield {
                "event": "token",
                "index": index,
                "token_id": result.token_id,
                "text": stream.push(result.token_id),
                "ms": round(result.wall_ms, 3),
            }
            if result.token_id in request.stop_ids:
                finish = "stop"
            feed = [result.token_id]
    finally:
        await pipeline.close_session(session)
    decode_steps = max(len(generated) - 1, 0)
    yield {
        "event": "done",
        "token_ids": generated,
        "text": tokenizer.decode(generated),
        "finish_reason": finish,
        "stats": {
            "prompt_tokens": len(ids),
            "generated_tokens": len(generated),
            "prefill_ms": round(prefill_ms, 3),
            "decode_tok_s": round(decode_steps / (decode_wall / 1000), 3) if decode_wall else None,
            "total_s": round(time.perf_counter() - started, 3),
            "network_ms_per_token": round(network_ms / network_steps, 3) if network_steps else None,
            "hops": _hop_summary(decode_timings),
            # what the pipeline adds: the activation budget used, a draft's acceptance, ...
            **(summary() if callable(summary := getattr(pipeline, "summary", None)) else {}),
        },
    }
