"""The client's side of spot checks: pick steps at random, ask the coordinator to check them, act on the verdict.

A check covers every position the session has fed so far (see ``engine.coordinator.verifier``),
so one failed check is enough to find a node that perturbs its work, and the verdict says from
which position the output may be wrong. The client then regenerates from there on a route
without the culprits (``RemotePipeline`` does the rewind; ``generate_events`` shows it as a
``rewind`` event), which is what keeps the developer's output equal to an honest run. Checks run
beside generation, not in its way; a generation waits for the checks still running before it
ends (``settle``), so no verdict comes too late to correct the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.errors import KlusterError

log = logging.getLogger(__name__)

#: how long ``settle`` waits for the checks still running at the end of a generation
SETTLE_S = 60.0
#: rewinds a session takes at most: a failed check that names nobody to avoid would otherwise
#: have the same route regenerate the same output, fail again, and never finish
MAX_REWINDS = 3


@dataclass
class SpotStats:
    requested: int = 0
    passed: int = 0
    #: passing checks that covered the generated tokens too (greedy, or sampled with top-p 1)
    tokens_checked: int = 0
    failed: int = 0
    unavailable: int = 0
    busy: int = 0
    errors: int = 0
    #: failed checks whose rewind was not taken (the session had rewound MAX_REWINDS times)
    unresolved: int = 0
    #: positions covered by the checks that passed (a position is counted once per check)
    positions_passed: int = 0
    #: generated tokens (steps) covered by a passing check, each counted once per session
    steps_verified: int = 0
    #: nodes the checks found guilty (banned by the coordinator) or in dispute (avoided by us)
    guilty: list[str] = field(default_factory=list)
    disputed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SpotChecker:
    """Runs a session's checks in the background and keeps what their verdicts ask of the generation."""

    def __init__(
        self,
        fraction: float,
        post: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        avoid: Callable[[str], None],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.fraction = fraction
        self._post = post
        self._avoid = avoid
        #: not predictable from outside: a node must not guess which steps are checked
        self._rng = rng or random.SystemRandom()
        self.stats = SpotStats()
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}
        self._rewinds: dict[str, int] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        #: per session, the most generated positions a passing check covered
        self._covered: dict[str, int] = {}
        self._rewound: dict[str, int] = {}

    def maybe_check(self, session: str, body: dict[str, Any]) -> None:
        """Check this step with probability ``fraction`` (``body`` is the ``/v1/audit`` request)."""
        if self.fraction <= 0 or self._rng.random() >= self.fraction or session in self._rewinds:
            return  # (a failed check already says to regenerate: checking more of the same adds nothing)
        self.stats.requested += 1
        task = asyncio.create_task(self._check(session, body), name="spot-check")
        tasks = self._tasks.setdefault(session, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _check(self, session: str, body: dict[str, Any]) -> None:
        try:
            verdict = await self._post(body)
        except KlusterError as exc:
            self.stats.errors += 1
            log.warning("spot check not made: %s", exc)
            return
        status = verdict.get("status")
        if status == "pass":
            self.stats.passed += 1
            self.stats.tokens_checked += verdict.get("tokens_checked") is True
            positions = int(verdict.get("positions") or 0)
            self.stats.positions_passed += positions
            steps = max(0, positions - int(body.get("prompt_tokens") or 0))
            if steps > self._covered.get(session, 0):
                self.stats.steps_verified += steps - self._covered.get(session, 0)
                self._covered[session] = steps
        elif status == "unavailable":
            self.stats.unavailable += 1
            # a hop that cannot show its record of work it just did is not routed through again by
            # us (not banned: a trail can be legitimately gone, e.g. a session past 2,048 positions)
            for hop in verdict.get("silent", []):
                self._avoid(str(hop.get("peer_id")))
            log.info("spot check unavailable: %s", verdict.get("silent"))
        elif status == "busy":
            self.stats.busy += 1
        elif status == "fail":
            self._failed(session, verdict)
        else:
            self.stats.errors += 1

    def _failed(self, session: str, verdict: dict[str, Any]) -> None:
        self.stats.failed += 1
        guilty_hops = verdict.get("guilty", [])
        disputed_hops = [hop for pair in verdict.get("disputed", []) for hop in pair]
        for hop in (*guilty_hops, *disputed_hops):
            self._avoid(str(hop.get("peer_id")))
        guilty = [str(h.get("name") or h.get("peer_id")) for h in guilty_hops]
        disputed = [str(h.get("name") or h.get("peer_id")) for h in disputed_hops]
        self.stats.guilty.extend(n for n in guilty if n not in self.stats.guilty)
        self.stats.disputed.extend(n for n in disputed if n not in self.stats.disputed)
        rewind = verdict.get("rewind_to")
        if isinstance(rewind, int):
            if session in self._rewinds:  # one rewind waiting already: it goes back at least as far
                self._rewinds[session] = min(rewind, self._rewinds[session])
            elif self._rewound.get(session, 0) >= MAX_REWINDS:
                self.stats.unresolved += 1
                log.error("spot check failed again after %d rewinds; not regenerating once more", MAX_REWINDS)
            else:
                self._rewound[session] = self._rewound.get(session, 0) + 1
                self._rewinds[session] = rewind
        log.warning("spot check failed: guilty %s, disputed %s, regenerate from position %s", guilty, disputed, rewind)
        self._events.setdefault(session, []).append(
            {"event": "spot_check", "status": "fail", "guilty": guilty, "disputed": disputed, "rewind_to": rewind}
        )

    def pending_rewind(self, session: str) -> int | None:
        """The first position to regenerate, once (None: nothing to redo)."""
        return self._rewinds.pop(session, None)

    def take_events(self, session: str) -> list[dict[str, Any]]:
        return self._events.pop(session, [])

    async def settle(self, session: str, timeout_s: float = SETTLE_S) -> None:
        """Wait for the session's checks still running (at most ``timeout_s``)."""
        tasks = set(self._tasks.get(session, ()))
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout_s)

    async def close(self) -> None:
        for tasks in self._tasks.values():
            for task in tasks:
                task.cancel()
        self._tasks.clear()
