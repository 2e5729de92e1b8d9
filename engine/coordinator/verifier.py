"""Spot-check verification at the coordinator: re-execute a job's history and find who returned wrong work.

Flow. A client picks a random fraction of its steps and, for each, posts ``/v1/audit`` naming its
job, its session and how many positions to check. The coordinator asks every hop of the job's
route (the route it handed out, not one the client names) for its audit trail over those
positions (``audit_query`` / ``audit_reply`` on the node's signalling socket; see
``engine.audit.trail``), recomputes the whole history in one pass on its own copy of the model
(``engine.audit.reference``), and compares every view, position by position, within a tolerance
calibrated for honest differences (``kluster bench verify``). ``engine.audit.judge`` decides who
is to blame. The caller (``engine.coordinator.app``) bans the guilty: they are disconnected, may
not register again, earn nothing from then on and lose what they earned on the job.

What a client cannot do: make the coordinator compare against a history of its choosing (the
reference runs on the tokens the first hop recorded; a client whose own tokens differ only causes
a dispute, never a ban), or audit someone else's job. What a node cannot do: predict which steps
are checked (the choice comes after the fact, and every position is compared), or perturb what it
sends along directions its receiver's projection misses (that projection is secret to the
receiver). What this does not settle: a sender and a receiver contradicting each other about one
link (a dispute: both are avoided by the client, neither banned), and tokens sampled with top-p
below 1 (their hidden states are checked, the tokens are not).

Tokens are checked the way the last hop says it was asked to pick them (its trail records that),
and only if the client says the same: a client cannot get an honest sampling node banned by
calling the job greedy, and a last hop cannot excuse a wrong token by naming another seed, nor
escape the check by not saying (each makes the hop ``unavailable``: the client avoids it, nobody
is banned).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.audit.compare import assess
from engine.audit.judge import Blame
from engine.audit.reference import Tolerance, compute_reference
from engine.audit.sketch import MAX_AUDIT_POSITIONS, decode_rows
from engine.errors import KlusterError, ProtocolError
from engine.fragments import torch_thread
from engine.fragments.store import Pack, load_span
from engine.models.llama import FragmentModel
from engine.models.sampling import SamplingParams
from engine.protocol import messages as wire
from engine.protocol.codec import CODECS

log = logging.getLogger(__name__)

#: how long the hops have to answer an audit query
REPLY_TIMEOUT_S = 10.0
#: audits waiting or running at once; more are answered ``busy`` (the client just checks a later step)
MAX_PENDING = 8
#: routes remembered for audits (oldest forgotten first)
MAX_ROUTES = 4096
#: a node in link disputes with this many different nodes is banned: an honest node is in dispute
#: only with a partner that lies, so framing it takes that many colluding liars
DISPUTE_PARTNERS = 3


@dataclass(frozen=True)
class AuditHop:
    peer_id: str
    name: str
    start: int
    end: int


@dataclass(frozen=True)
class RouteRecord:
    """A route the coordinator handed out: what an audit of its job checks against."""

    model_id: str
    client: str
    hops: tuple[AuditHop, ...]
    skip: frozenset[int] = frozenset()


@dataclass
class _Reply:
    tokens: list[int] | None = None
    received: torch.Tensor | None = None
    sent: torch.Tensor | None = None
    #: the last hop's: how it was asked to pick tokens (None: it cannot say, or it changed)
    sampling: SamplingParams | None = None


def parse_sampling(raw: Any) -> SamplingParams | None:
    """``{"temperature", "top_p", "seed"}`` (as on the wire) as ``SamplingParams``; None for anything else."""
    try:
        s = wire.parse_sampling(raw)
    except ProtocolError:
        return None
    return SamplingParams(s.temperature, s.top_p, s.seed)


def claimed_sampling(body: dict[str, Any]) -> SamplingParams | None:
    """How an audit request says the tokens were picked: ``sampling``, or an older client's ``greedy``."""
    if "sampling" in body:
        return parse_sampling(body["sampling"])
    return SamplingParams() if body.get("greedy", True) is True else None


def same_choice(a: SamplingParams, b: SamplingParams) -> bool:
    """Whether two ways of picking tokens pick the same ones (greedy ignores top-p and seed; pure)."""
    return a == b or a.temperature == b.temperature == 0


@dataclass
class AuditStats:
    """Counters for ``/v1/health`` and the logs: how many audits, and how far honest hops ever were."""

    audits: int = 0
    passed: int = 0
    failed: int = 0
    unavailable: int = 0
    positions: int = 0
    #: the largest relative error of a view in an audit that passed (the tolerance's real margin)
    max_pass_error: float = 0.0


class Verifier:
    """Runs audits. Call from the event loop; the recomputation runs on the torch thread."""

    def __init__(
        self,
        packs: dict[str, Pack],
        key_for: Callable[[str], bytes],
        send: Callable[[str, dict[str, Any]], Awaitable[bool]],
        *,
        tolerance: Tolerance | None = None,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:
        self.packs = packs
        self.key_for = key_for
        self._send = send
        self.tolerance = tolerance or Tolerance()
        self.reply_timeout_s = reply_timeout_s
        self.stats = AuditStats()
        self._routes: OrderedDict[str, RouteRecord] = OrderedDict()
        self._models: dict[str, FragmentModel] = {}
        self._load_lock = asyncio.Lock()
        self._compute_lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._pending = 0
        #: node -> the nodes it was in a link dispute with (this run; see DISPUTE_PARTNERS)
        self._partners: dict[str, set[str]] = {}
        self._names: dict[str, str] = {}

    def remember(self, job: str, record: RouteRecord) -> None:
        self._routes[job] = record
        while len(self._routes) > MAX_ROUTES:
            self._routes.popitem(last=False)

    def route_of(self, job: str) -> RouteRecord | None:
        return self._routes.get(job)

    def on_reply(self, peer_id: str, data: dict[str, Any]) -> None:
        """An ``audit_reply`` from a node: hand it to the audit waiting for it (if from the node asked)."""
        key = f"{peer_id}:{data.get('id')}"
        fut = self._waiting.get(key)
        if fut is not None and not fut.done():
            fut.set_result(data)

    async def _model(self, model_id: str) -> FragmentModel:
        async with self._load_lock:
            model = self._models.get(model_id)
            if model is None:
                pack = self.packs[model_id]
                folders = [pack.fragment_dir(i) for i in range(len(pack.manifests))]
                started = time.perf_counter()
                _, model = await torch_thread.run_loader(load_span, folders)
                self._models[model_id] = model
                log.info("loaded %s for spot checks in %.1f s", model_id, time.perf_counter() - started)
            return model

    async def _ask(self, hop: AuditHop, session: str, positions: int) -> dict[str, Any]:
        qid = str(next(self._ids))
        key = f"{hop.peer_id}:{qid}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        try:
            query = {"type": "audit_query", "id": qid, "session": session, "positions": positions}
            if not await self._send(hop.peer_id, query):
                return {"missing": "not connected"}
            return await asyncio.wait_for(fut, self.reply_timeout_s)
        except TimeoutError:
            return {"missing": f"no answer within {self.reply_timeout_s:g} s"}
        finally:
            self._waiting.pop(key, None)

    async def audit(
        self,
        job: str,
        session: str,
        client_tokens: Sequence[int],
        *,
        prompt_tokens: int,
        sampling: SamplingParams | None,
        codec: str,
    ) -> dict[str, Any]:
        """Check ``session`` on ``job``'s route at every position ``client_tokens`` covers; the verdict as JSON.

        ``sampling``: how the client says it asked for tokens (None: it does not say; then the
        tokens are not checked, the hidden states still are).

        ``status``: ``pass``, ``fail`` (``guilty`` and/or ``disputed`` name nodes; ``rewind_to`` is
        the first position to regenerate), ``unavailable`` (``silent`` names hops that could not
        show their trail) or ``busy``.
        """
        record = self._routes.get(job)
        if record is None:
            raise KlusterError(f"no route of job {job!r} is known here")
        if codec not in CODECS:
            raise KlusterError(f"unknown codec {codec!r}")
        if not 0 < len(client_tokens) <= MAX_AUDIT_POSITIONS:
            raise KlusterError(f"an audit covers 1-{MAX_AUDIT_POSITIONS} positions, with one token each")
        if self._pending >= MAX_PENDING:
            return {"status": "busy"}
        self._pending += 1
        try:
            return await self._audit(record, job, session, list(client_tokens), prompt_tokens, sampling, codec)
        finally:
            self._pending -= 1

    async def _audit(
        self,
        record: RouteRecord,
        job: str,
        session: str,
        client_tokens: list[int],
        prompt_tokens: int,
        sampling: SamplingParams | None,
        codec: str,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        hops = record.hops
        positions = len(client_tokens)
        answers = await asyncio.gather(*(self._ask(h, session, positions) for h in hops))
        replies: list[_Reply] = []
        silent: list[dict[str, str]] = []
        for index, (hop, answer) in enumerate(zip(hops, answers, strict=True)):
            try:
                replies.append(_parse_reply(answer, positions, index, len(hops), codec, sampling))
            except ProtocolError as exc:
                silent.append({"peer_id": hop.peer_id, "name": hop.name, "why": str(exc)})
        if silent:
            self.stats.unavailable += 1
            return {"status": "unavailable", "silent": silent, "positions": positions}
        route_tokens = replies[0].tokens or []
        asked = replies[-1].sampling if sampling is not None else None  # (the client's claim, confirmed)
        checked = asked if asked is not None and (asked.temperature == 0 or asked.top_p == 1.0) else None
        model = await self._model(record.model_id)
        async with self._compute_lock:
            ref = await torch_thread.run(
                compute_reference,
                model,
                route_tokens,
                [(h.start, h.end) for h in hops],
                skip=record.skip,
                codec=codec,
                sampling=checked,
                first_checked=prompt_tokens,
            )
        disagree = next((p for p, (a, b) in enumerate(zip(client_tokens, route_tokens, strict=True)) if a != b), None)
        found = assess(  # (_parse_reply made sure every boundary has both records)
            ref,
            [r.sent for r in replies[:-1] if r.sent is not None],
            [r.received for r in replies[1:] if r.received is not None],
            [self.key_for(h.peer_id) for h in hops],
            route_tokens,
            given=prompt_tokens,
            check_tokens=checked is not None,
            tolerance=self.tolerance,
            tokens_disagree_at=disagree,
        )
        blame_, errors = found.blame, max(found.errors, default=0.0)
        self._note_disputes(record, blame_)
        verdict = self._verdict(record, blame_, errors, positions)
        verdict["tokens_checked"] = checked is not None
        verdict["ms"] = round((time.perf_counter() - started) * 1000, 1)
        self.stats.audits += 1
        self.stats.positions += positions
        if not blame_.failed:
            self.stats.passed += 1
            self.stats.max_pass_error = max(self.stats.max_pass_error, errors)
        else:
            self.stats.failed += 1
            log.warning("spot check of job %s session %s failed: %s", job, session, verdict)
        return verdict

    def _note_disputes(self, record: RouteRecord, found: Blame) -> None:
        for a, b in found.links:
            x, y = record.hops[a], record.hops[b]
            self._partners.setdefault(x.peer_id, set()).add(y.peer_id)
            self._partners.setdefault(y.peer_id, set()).add(x.peer_id)
            self._names.update({x.peer_id: x.name, y.peer_id: y.name})

    def repeat_offenders(self) -> list[tuple[str, str, int]]:
        """``(peer id, name, partners)`` of the nodes in link disputes with DISPUTE_PARTNERS others."""
        return [(p, self._names.get(p, p), len(self._partners[p])) for p in repeat_offenders(self._partners)]

    def _verdict(self, record: RouteRecord, found: Blame, worst: float, positions: int) -> dict[str, Any]:
        def who(index: int) -> dict[str, str]:
            h = record.hops[index]
            return {"peer_id": h.peer_id, "name": h.name}

        return {
            "status": "fail" if found.failed else "pass",
            "positions": positions,
            "max_error": round(worst, 6),
            "guilty": [who(b) for b in found.guilty],
            "disputed": [[who(a), who(b)] for a, b in found.disputes],
            "link_disputes": [[who(a), who(b)] for a, b in found.links],
            "rewind_to": found.rewind_to,
        }


def repeat_offenders(partners: dict[str, set[str]], threshold: int = DISPUTE_PARTNERS) -> list[str]:
    """Nodes in link disputes with at least ``threshold`` different nodes (pure; see DISPUTE_PARTNERS).

    One dispute cannot say which side lied; a node that contradicts many different partners, each
    of which agrees with everyone else, is the liar.
    """
    return sorted(node for node, others in partners.items() if len(others) >= threshold)


def _parse_reply(
    answer: dict[str, Any], positions: int, index: int, hops: int, codec: str, claim: SamplingParams | None = None
) -> _Reply:
    """Check one hop's ``audit_reply``: the views its place in the route must hold, for every position.

    The last hop's record of how it was asked to pick tokens must agree with the client's ``claim``.
    """
    if not isinstance(answer, dict) or "missing" in answer:
        why = answer.get("missing") if isinstance(answer, dict) else None
        raise ProtocolError(str(why or "no trail"))
    if answer.get("positions") != positions:
        raise ProtocolError(f"trail of {answer.get('positions')} positions, {positions} asked")
    if answer.get("codec", "fp32") != codec:
        raise ProtocolError(f"the hop saw codec {answer.get('codec')!r}, the client says {codec!r}")
    reply = _Reply()
    if index == 0:
        tokens = answer.get("tokens")
        if not isinstance(tokens, list) or len(tokens) != positions or not all(type(t) is int for t in tokens):
            raise ProtocolError("the first hop's trail lacks its token ids")
        reply.tokens = tokens
    else:
        reply.received = decode_rows(answer.get("received"), positions)
    if index < hops - 1:
        reply.sent = decode_rows(answer.get("sent"), positions)
    else:
        reply.sampling = parse_sampling(answer.get("sampling"))
        if claim is not None and reply.sampling is None:
            # (else a last hop could keep its tokens from being checked by saying nothing, or "mixed")
            raise ProtocolError("the last hop's trail does not say how it was asked to pick tokens")
        if claim is not None and reply.sampling is not None and not same_choice(claim, reply.sampling):
            raise ProtocolError(f"the last hop was asked to pick tokens with {reply.sampling}, the client says {claim}")
    return reply
