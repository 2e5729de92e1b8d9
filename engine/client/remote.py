"""The distributed pipeline: a route of nodes, activations chained node to node over WebRTC.

The client sends the prompt to the first hop only; every hop forwards its output to the next;
the last hop samples, sends the token here and (ring mode, the default) also feeds it straight
back to the first hop for the next step, until the token budget or a stop token ends the ring.
One token therefore costs the sum of one-way hop delays around A -> B -> C -> A plus compute:
the client is not in the per-token loop, and no activation ever makes a star through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import torch

from engine.client.generation import StepResult
from engine.client.receipts import Countersigner
from engine.client.spotcheck import SpotChecker
from engine.coordinator.auth import SessionAuth
from engine.errors import (
    ConfigError,
    CoordinatorError,
    FragmentError,
    KlusterError,
    NoRouteError,
    PeerError,
    SessionLostError,
    TransportError,
    error_for_code,
)
from engine.fragments import torch_thread
from engine.models.llama import FragmentModel
from engine.models.sampling import SamplingParams
from engine.protocol import frames
from engine.protocol import messages as wire
from engine.protocol.codec import CODECS
from engine.transport.peer import PeerManager
from engine.transport.signaling import SignalingClient, get_json, raise_for_error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteHop:
    peer_id: str
    name: str
    start: int
    end: int


def _route_nodes(route: list[RouteHop]) -> list[dict[str, Any]]:
    """A route as the JSON events show it (``route`` and ``failover``)."""
    return [{"name": h.name, "peer_id": h.peer_id, "layers": [h.start, h.end]} for h in route]


@dataclass
class _SessionState:
    """Where a session stands: the next step, how far the ring runs unasked, and what to replay."""

    #: the session id on the wire; a failover starts a fresh one on the new route
    wire_id: str
    next_step: int = 0
    next_pos: int = 0
    last_token: int = -1
    last_arrival: float = 0.0
    #: steps the route will still compute by itself (0: the next step must be sent)
    ring_left: int = 0
    #: every token fed so far, and the size of each step: a failover replays exactly these steps
    history: list[int] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    #: positions whose tokens the client fed itself on the current wire session (the prompt, or a
    #: failover's replay): a spot check holds the route to account only for the tokens after them
    given: int = 0
    #: how the session's tokens are picked (a spot check checks them against the reference this way)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    #: a failed spot check's rewind was handed out: the next step back in time regenerates without
    #: the culprits (for verify steps, going back is otherwise a rejected draft)
    spot_rewind: bool = False


def _accepted(fed: list[int], greedy: tuple[int, ...]) -> int:
    """Drafts of a verify step the route agreed with: ``fed[i + 1]`` is the greedy token after ``fed[i]``.

    Only those positions are settled; the rest are dropped by the next step, so a spot check
    must not hold the route to account for them (pure).
    """
    count = 0
    while count + 1 < len(fed) and count < len(greedy) and fed[count + 1] == greedy[count]:
        count += 1
    return count


def _rewind(state: _SessionState, pos: int) -> None:
    """Forget what was sent from ``pos`` on (rejected drafts): a replay must not carry them."""
    del state.history[pos:]
    kept, total = [], 0
    for size in state.chunks:
        if total + size >= pos:
            if pos > total:
                kept.append(pos - total)
            break
        kept.append(size)
        total += size
    state.chunks = kept
    state.next_pos = pos


#: HTTP requests to the coordinator made with our session (route, model list, tokenizer files)
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)

#: A failed node is avoided this long, or until the coordinator says it is ready again. Not for
#: ever: the failure may have been ours (our own network dropped), and a node that is truly gone
#: is not offered by the coordinator anyway.
EXCLUDE_S = 10.0
#: At shutdown, the hops' receipts for work since the last receipt (signed when sessions close)
#: are still on their way: wait until every hop sent one, or none came for RECEIPT_QUIET_S, at
#: most RECEIPT_WAIT_S, so a short generation does not leave its work unpaid.
RECEIPT_QUIET_S = 0.5
RECEIPT_WAIT_S = 3.0

#: errors after which the route is replaced and the session replayed on the new one
_FAILOVER_ERRORS = (PeerError, TransportError, SessionLostError, FragmentError)


class RemotePipeline:
    """A ``Pipeline`` whose steps run on a route of nodes found through the coordinator."""

    def __init__(
        self,
        coordinator: str,
        model_id: str,
        *,
        step_timeout_s: float = 60.0,
        name: str = "client",
        ring: bool = True,
        max_failovers: int = 3,
        route_wait_s: float = 60.0,
        codec: str = "fp32",
        activation: float = 1.0,
        private_nodes: tuple[str, ...] = (),
        auth: SessionAuth | None = None,
        spot_check: float = 0.0,
    ) -> None:
        if codec not in CODECS:
            raise ConfigError(f"unknown activation codec {codec!r} (known: {', '.join(CODECS)})")
        #: how hidden states travel between the route's hops (fp32 exact; int8 ~3.6x smaller)
        self.codec = codec
        if not 0.0 < activation <= 1.0:
            raise ConfigError(f"activation must be in (0, 1], got {activation:g}")
        #: the share of layer compute each request runs (Selective Activation); the coordinator
        #: turns it into layers to skip and leaves out hops whose layers are all skipped
        self.activation = activation
        #: a private job: only these nodes (names or peer ids) may run its first and last hop, which
        #: see its tokens; every route, failovers included, is asked for with them
        self.private_nodes = tuple(private_nodes)
        #: absolute layers skipped on the current route, and the coordinator's account of the budget
        self.skip: tuple[int, ...] = ()
        self.budget: dict[str, Any] | None = None
        self.model_id = model_id
        #: route replacements tried for one step before its error reaches the caller
        self.max_failovers = max_failovers
        #: how long a failover waits for the coordinator to offer a route without the failed nodes
        #: (long enough for a partitioned node, the only host of its span, to come back)
        self.route_wait_s = route_wait_s
        #: nodes a failover avoids, until the monotonic time given (see EXCLUDE_S)
        self._excluded: dict[str, float] = {}
        self._gone: dict[str, str] = {}
        #: let the route feed each sampled token back to its first hop by itself (one hop fewer per token)
        self.ring = ring
        self.step_timeout_s = step_timeout_s
        self.signaling = SignalingClient(coordinator, "client", name, on_control=self._on_control)
        #: our developer account's sessions (None: the coordinator runs with auth off); the caller owns it
        self.auth = auth
        self.peers: PeerManager | None = None
        self.route: list[RouteHop] = []
        #: the job the coordinator assigned the current route under ("" from a coordinator without billing)
        self.job = ""
        #: countersigns the route's work receipts (engine.client.receipts)
        self.receipts = Countersigner(self.signaling.identity)
        #: when we last closed a session, and which hops sent a receipt since (see RECEIPT_QUIET_S)
        self._closed_at: float | None = None
        self._receipted_since_close: set[str] = set()
        self._last_receipt_at = 0.0
        self._pending: dict[tuple[str, int], asyncio.Future[wire.Token]] = {}
        self._arrived: dict[tuple[str, int], tuple[wire.Token | KlusterError, float]] = {}
        #: step frames for the forwards we send to first hops
        self._frames = frames.FrameWriter()
        self._sessions: dict[str, _SessionState] = {}
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        if not 0.0 <= spot_check <= 1.0:
            raise ConfigError(f"spot_check must be a fraction of steps in [0, 1], got {spot_check:g}")
        #: nodes a spot check found guilty or in dispute: never routed through again by this pipeline
        self._avoided: set[str] = set()
        #: spot checks of a random ``spot_check`` share of steps (engine.client.spotcheck)
        self.spot = SpotChecker(spot_check, self._post_audit, self._avoided.add) if spot_check > 0 else None

    async def start(self) -> list[RouteHop]:
        """Connect to the coordinator and get a route for the model."""
        if self.auth is not None:
            await self.auth.token()  # the hello needs a session
        await self.signaling.connect(self._hello_extra())
        self._start_peers()
        self._runner = asyncio.create_task(
            self.signaling.serve(lambda: self._stopping, extra=self._hello_extra, on_new_identity=self._new_identity),
            name="signaling",
        )
        self.route = await self._fetch_route()
        return self.route

    def _hello_extra(self) -> dict[str, Any]:
        return self.auth.hello() if self.auth is not None else {}

    async def _http_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET from the coordinator's API, with a session when we have an account."""
        if self.auth is None:
            return await self.signaling.http_json(path, params)
        async with self._http_session(_HTTP_TIMEOUT) as http:
            return await get_json(http, self.signaling.coordinator + path, params)

    def _http_session(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        """An HTTP session to the coordinator, with our developer account's sessions when we have one."""
        middlewares = (self.auth.middleware,) if self.auth is not None else ()
        return aiohttp.ClientSession(timeout=timeout, middlewares=middlewares)

    async def _post_audit(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/audit`` (a spot check); the verdict (``busy`` when this account's check budget is
        spent for now: HTTP 429), or a CoordinatorError."""
        try:
            async with (
                self._http_session(aiohttp.ClientTimeout(total=120, sock_connect=10)) as http,
                http.post(self.signaling.coordinator + "/v1/audit", json=body) as resp,
            ):
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise CoordinatorError(f"spot check request failed: {exc or type(exc).__name__}") from None
        if resp.status == 429:
            log.info("spot check not made: the coordinator says this account's check budget is spent")
            return {"status": "busy"}
        raise_for_error_body(resp.status, data)
        if not isinstance(data, dict):
            raise CoordinatorError("the coordinator sent no verdict")
        return data

    def pending_rewind(self, session: str) -> int | None:
        """The first position a failed spot check says to regenerate (None: none)."""
        rewind = None if self.spot is None else self.spot.pending_rewind(session)
        if rewind is not None and session in self._sessions:
            self._sessions[session].spot_rewind = True
        return rewind

    async def settle(self, session: str) -> None:
        """Wait for the session's spot checks still running (a generation calls this before it ends)."""
        if self.spot is not None:
            await self.spot.settle(session)

    async def _http_bytes(self, path: str) -> bytes:
        if self.auth is None:
            return await self.signaling.http_bytes(path)
        try:
            async with (
                self._http_session(_HTTP_TIMEOUT) as http,
                http.get(self.signaling.coordinator + path) as resp,
            ):
                if resp.status != 200:
                    raise CoordinatorError(f"coordinator answered HTTP {resp.status} for {path}")
                return await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise CoordinatorError(f"coordinator request {path} failed: {exc}") from None

    def _start_peers(self) -> None:
        self.peers = self.signaling.open_peers(self._on_message, on_link_lost=self._on_link_lost)

    async def _new_identity(self, old_id: str) -> None:
        """The coordinator forgot us (it restarted) and gave us a new id: nodes can no longer reach
        the old one, so the links are rebuilt under the new id and waiting steps fail over, which
        replays them."""
        if self.peers is not None:
            await self.peers.shutdown()
        self._start_peers()
        self._fail_waiting(TransportError("the coordinator gave this client a new identity"))

    async def _on_link_lost(self, peer: str, reason: str) -> None:
        """A hop we talk to directly went silent or closed: its waiting steps fail over now."""
        if any(h.peer_id == peer for h in self.route):
            error = TransportError(f"lost the link to node {self.name_of(peer)} ({reason})")
            error.peer_id = peer
            self._fail_waiting(error)

    def _fail_waiting(self, error: KlusterError) -> None:
        for key in list(self._pending):
            self._deliver(key, error)

    async def _fetch_route(self) -> list[RouteHop]:
        params = {"model": self.model_id, "client": self.signaling.peer_id}
        if self.activation < 1.0:
            params["activation"] = f"{self.activation:g}"
        now = time.monotonic()
        if self.private_nodes:
            params["allow"] = ",".join(self.private_nodes)
        excluded = sorted({p for p, until in self._excluded.items() if until > now} | self._avoided)
        if excluded:
            params["exclude"] = ",".join(excluded)
        body = await self._http_json("/v1/route", params)
        try:
            route = [RouteHop(str(h["peer_id"]), str(h["name"]), int(h["start"]), int(h["end"])) for h in body["route"]]
            budget = body.get("budget")
            self.skip = tuple(int(i) for i in budget["skip"]) if isinstance(budget, dict) else ()
            self.budget = budget if isinstance(budget, dict) else None
            self.job = str(body.get("job") or "")
            if self.job:
                self.receipts.job_started(self.job, self.model_id, {h.peer_id: (h.start, h.end) for h in route})
            return route
        except (KeyError, TypeError, ValueError):
            raise CoordinatorError("coordinator sent a malformed route") from None

    async def _on_control(self, data: dict[str, Any]) -> None:
        """Coordinator notices: a node of our route that left fails its waiting steps at once."""
        if data.get("type") == "receipt":  # a hop's work receipt, relayed: countersign it if we asked for it
            signed = self.receipts.consider(data.get("receipt"))
            self._last_receipt_at = time.monotonic()
            if signed is not None:
                self._receipted_since_close.add(signed.receipt.supplier)
                with contextlib.suppress(KlusterError):
                    await self.signaling.send({"type": "countersigned", "receipt": signed.to_json()})
            return
        if data.get("type") == "node_ready":  # back after a blip, or new: it may be routed through again
            self._excluded.pop(str(data.get("peer_id")), None)
            self._gone.pop(str(data.get("peer_id")), None)
            return
        if data.get("type") != "node_gone":
            return
        peer = str(data.get("peer_id"))
        self._excluded[peer] = time.monotonic() + EXCLUDE_S
        self._gone[peer] = str(data.get("name") or peer)
        if any(h.peer_id == peer for h in self.route):
            self._fail_waiting(self._gone_error(peer))

    def _gone_error(self, peer: str) -> PeerError:
        error = PeerError(f"node {self._gone.get(peer, peer)} left the grid")
        error.peer_id = peer
        return error

    def route_event(self) -> dict[str, Any]:
        return {
            "event": "route",
            "model": self.model_id,
            "nodes": _route_nodes(self.route),
        }

    def name_of(self, peer_id: str, route: list[RouteHop] | None = None) -> str:
        return next((h.name for h in (self.route if route is None else route) if h.peer_id == peer_id), peer_id)

    async def fetch_tokenizer(self, cache_dir: Path) -> Path:
        """Download the model's tokenizer files from the coordinator into a cache folder."""
        models = await self._http_json("/v1/models")
        entry = next((m for m in models.get("models", []) if m.get("model_id") == self.model_id), None)
        if entry is None:
            raise CoordinatorError(f"coordinator does not list model '{self.model_id}'")
        folder = cache_dir / "tokenizers" / self.model_id
        folder.mkdir(parents=True, exist_ok=True)
        for name, sha in dict(entry.get("tokenizer", {})).items():
            target = folder / name
            if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha:
                continue
            data = await self._http_bytes(f"/v1/models/{self.model_id}/tokenizer/{name}")
            if hashlib.sha256(data).hexdigest() != sha:
                raise CoordinatorError(f"tokenizer file {name} from the coordinator fails its sha256 check")
            target.write_bytes(data)
        return folder

    def summary(self) -> dict[str, Any]:
        """The activation budget this pipeline's route runs under, for the ``done`` event."""
        out: dict[str, Any] = {}
        if self.budget is not None:
            out["activation"] = {**self.budget, "hops": len(self.route)}
        if self.spot is not None:
            out["spot_checks"] = self.spot.stats.to_dict()
        return out

    async def budget_for(self, activation: float) -> dict[str, Any]:
        """The coordinator's plan for ``activation`` (layers to skip), without changing our own route."""
        body = await self._http_json("/v1/route", {"model": self.model_id, "activation": f"{activation:g}"})
        budget = body.get("budget")
        if not isinstance(budget, dict) or not isinstance(budget.get("skip"), list):
            raise CoordinatorError("coordinator sent no activation plan")
        return budget

    async def fetch_model(self, cache_dir: Path) -> FragmentModel:
        """The whole model, fetched fragment by fragment from the coordinator (hash-checked, cached).

        A self-speculative draft runs here, so its drafted tokens cost no WAN hop.
        """
        from engine.fragments.manifest import parse_manifest
        from engine.fragments.store import load_span
        from engine.node.fetch import fetch_fragment

        models = await self._http_json("/v1/models")
        entry = next((m for m in models.get("models", []) if m.get("model_id") == self.model_id), None)
        if entry is None:
            raise CoordinatorError(f"coordinator does not list model '{self.model_id}'")
        folders = []
        async with self._http_session(aiohttp.ClientTimeout(total=3600, sock_connect=10)) as http:
            for frag in entry.get("fragments", []):
                base = f"{self.signaling.coordinator}/v1/models/{self.model_id}/fragments/{frag['name']}/"
                async with http.get(base + "manifest.json") as resp:
                    if resp.status != 200:
                        raise CoordinatorError(f"fetching {base}manifest.json failed: HTTP {resp.status}")
                    manifest = parse_manifest(await resp.json(content_type=None))
                folders.append(await fetch_fragment(http, base, manifest, cache_dir))
        _, model = await torch_thread.run_loader(load_span, folders)
        return model

    def _hops(self) -> tuple[wire.Hop, ...]:
        return tuple(wire.Hop(h.peer_id, h.start, h.end) for h in self.route)

    def _deliver(self, key: tuple[str, int], outcome: wire.Token | KlusterError) -> None:
        """Hand a step's outcome to its waiter, or keep it until ``step`` asks (the ring runs ahead)."""
        fut = self._pending.get(key)
        if fut is not None and not fut.done():
            if isinstance(outcome, KlusterError):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)
        elif key[0] in self._live_wire_ids():
            self._arrived[key] = (outcome, time.perf_counter())

    async def _on_message(self, sender: str, data: bytes) -> None:
        try:
            msg = wire.decode(data)
        except KlusterError as exc:
            log.warning("malformed message from %s: %s", sender, exc)
            return
        if isinstance(msg, wire.Token):
            self._deliver((msg.session, msg.step), msg)
        elif isinstance(msg, wire.ErrorReply):
            error = error_for_code(msg.code, f"node {self.name_of(msg.peer)}: {msg.message}")
            error.peer_id = msg.failed_peer or msg.peer
            if msg.session is not None and msg.step is not None:
                self._deliver((msg.session, msg.step), error)
            else:
                self._fail_waiting(error)

    async def step(
        self,
        session: str,
        pos: int,
        tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
        *,
        verify: bool = False,
    ) -> StepResult:
        """Next token for ``session``; in ring mode most steps only wait for what the route already computes.

        If a node of the route fails (error reply, lost link, or the coordinator reporting it gone),
        the route is replaced and the session's exact step sequence is replayed on the new one in a
        single message, so the output continues as if nothing happened.

        ``verify``: a self-speculative check (greedy): ``pos`` may lie before the positions sent so
        far (the caller rejected drafted tokens; the route drops them), and the result's
        ``tokens`` holds the greedy token after every position of ``tokens``.
        """
        if self.peers is None or not self.route:
            raise CoordinatorError("pipeline not started")
        state = self._sessions.setdefault(session, _SessionState(wire_id=session))
        if state.next_step == 0:
            state.given, state.sampling = len(tokens), sampling
        events: list[dict[str, Any]] = []
        rewound = False
        if pos < state.next_pos and (state.spot_rewind or not verify):
            # a failed spot check: regenerate from ``pos`` without its culprits
            state.spot_rewind = False
            _rewind(state, pos)
            state.ring_left = 0
            event = await self._reroute(state)
            if event is not None:
                events.append(event)
            rewound = True
        elif verify and pos < state.next_pos:  # drafts the caller rejected
            _rewind(state, pos)
        continuing = state.ring_left > 0 and state.next_pos == pos and tokens == [state.last_token]
        t0 = state.last_arrival if continuing else time.perf_counter()
        replay = rewound
        for attempt in range(self.max_failovers + 1):
            try:
                token, arrival = await self._run_step(
                    state,
                    pos,
                    tokens,
                    max_tokens,
                    sampling,
                    stop_ids,
                    send=not continuing or replay,
                    replay=replay,
                    verify=verify,
                )
                break
            except _FAILOVER_ERRORS as exc:
                state.ring_left = 0
                if attempt == self.max_failovers:
                    raise
                events.append(await self._failover(state, exc))
                replay = True
            except BaseException:
                state.ring_left = 0
                raise
        state.history.extend(tokens)
        state.chunks.append(len(tokens))
        state.next_step += 1
        state.next_pos = pos + len(tokens)
        state.last_token = token.token_id
        state.last_arrival = arrival
        state.ring_left = 0 if token.token_id in stop_ids else state.ring_left - 1
        if self.spot is not None and self.job:
            settled = pos + 1 + _accepted(tokens, token.tokens) if verify else len(state.history)
            self.spot.maybe_check(session, self._audit_request(state, settled))
            events.extend(self.spot.take_events(session))
        return StepResult(token.token_id, token.timings, (arrival - t0) * 1000, tuple(events), token.tokens)

    def _audit_request(self, state: _SessionState, positions: int) -> dict[str, Any]:
        """The ``/v1/audit`` body checking the first ``positions`` positions ``state`` fed on the current route."""
        return {
            "job": self.job,
            "session": state.wire_id,
            "client": self.signaling.peer_id,
            "tokens": state.history[:positions],
            "prompt_tokens": state.given,
            "sampling": asdict(state.sampling),
            "codec": self.codec,
        }

    async def _reroute(self, state: _SessionState) -> dict[str, Any] | None:
        """After a failed spot check: a new route if ours holds a node to avoid, else a fresh session on it."""
        bad = next((h.peer_id for h in self.route if h.peer_id in self._avoided), None)
        if bad is not None:
            cause = PeerError(f"a spot check found node {self.name_of(bad)} at fault")
            cause.peer_id = bad
            return await self._failover(state, cause)
        await self._close_wire_session(state)
        return None

    async def _run_step(
        self,
        state: _SessionState,
        pos: int,
        tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_ids: frozenset[int],
        *,
        send: bool,
        replay: bool,
        verify: bool = False,
    ) -> tuple[wire.Token, float]:
        """Send this step (or its replay) if needed, then wait for its token."""
        if self.peers is None:
            raise CoordinatorError("pipeline not started")
        key = (state.wire_id, state.next_step)
        if send:
            ring = max(0, max_tokens - (pos + len(tokens)) - 1) if self.ring and not verify else 0
            feed, start, chunks = (
                (state.history + tokens, 0, (*state.chunks, len(tokens))) if replay else (tokens, pos, ())
            )
            if replay:
                state.given = len(feed)
            msg = wire.Forward(
                state.wire_id,
                state.next_step,
                start,
                self._hops(),
                0,
                self.peers.self_id,
                wire.Sampling(sampling.temperature, sampling.top_p, sampling.seed),
                max_tokens,
                (),
                torch.tensor(feed, dtype=torch.int64),
                ring,
                tuple(sorted(stop_ids)),
                chunks,
                self.codec,
                skip=self.skip,
                verify=verify,
                job=self.job,
            )
            state.ring_left = ring + 1
            self.receipts.requested(self.job, len(feed) + ring)
        arrived = self._arrived.pop(key, None)
        if arrived is not None:
            outcome, arrival = arrived
            if isinstance(outcome, KlusterError):
                raise outcome
            return outcome, arrival
        gone = next((h.peer_id for h in self.route if h.peer_id in self._gone), None)
        if gone is not None:  # the coordinator already said a hop left: no token will come
            raise self._gone_error(gone)
        fut: asyncio.Future[wire.Token] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            if send:
                await self.peers.send(self.route[0].peer_id, self._frames.builder(frames.prepare(msg)))
            token = await asyncio.wait_for(fut, self.step_timeout_s)
            return token, time.perf_counter()
        except TimeoutError:
            raise PeerError(
                f"no token from the route within {self.step_timeout_s:.0f} s (a node stalled or died)"
            ) from None
        finally:
            self._pending.pop(key, None)

    async def _failover(self, state: _SessionState, cause: KlusterError) -> dict[str, Any]:
        """Replace the route after ``cause``; returns the ``failover`` event for the JSON stream."""
        detected = time.perf_counter()
        failed = cause.peer_id
        old = self.route
        log.info("route failed (%s); failing over", cause)
        if failed:
            self._excluded[failed] = time.monotonic() + EXCLUDE_S
        await self._close_wire_session(state, failed)
        deadline = time.monotonic() + self.route_wait_s
        while True:
            try:
                self.route = await self._fetch_route()
                break
            except (NoRouteError, CoordinatorError) as exc:  # no route yet, or the coordinator is unreachable
                if time.monotonic() > deadline:
                    raise NoRouteError(
                        f"{cause}, and no replacement came within {self.route_wait_s:g} s: {exc}"
                    ) from None
                await asyncio.sleep(0.2)
        return {
            "event": "failover",
            "failed_node": self.name_of(failed, old) if failed else None,
            "reason": str(cause),
            "at_token": state.next_step,
            "detected_after_ms": round((detected - state.last_arrival) * 1000, 1) if state.last_arrival else None,
            "new_route": _route_nodes(self.route),
            "recovery_ms": round((time.perf_counter() - detected) * 1000, 1),
        }

    async def _close_wire_session(self, state: _SessionState, failed: str | None = None) -> None:
        """End the session's life on the current route (its hops free their caches, unless ``failed`` is
        the first hop) and give it a fresh wire id: what arrives for the old one is dropped."""
        if self.peers is not None and self.route and self.route[0].peer_id != failed:
            close = wire.Close(state.wire_id, self._hops(), 0)
            with contextlib.suppress(KlusterError):
                await self.peers.send(self.route[0].peer_id, wire.encode(close))
        self._frames.forget_session(state.wire_id)
        state.wire_id = uuid.uuid4().hex
        live = self._live_wire_ids()
        for key in [k for k in self._arrived if k[0] not in live]:
            del self._arrived[key]

    def _live_wire_ids(self) -> set[str]:
        return {s.wire_id for s in self._sessions.values()}

    async def close_session(self, session: str) -> None:
        state = self._sessions.pop(session, None)
        if state is None:
            return
        for key in [k for k in self._arrived if k[0] == state.wire_id]:
            del self._arrived[key]
        self._frames.forget_session(state.wire_id)
        if self.peers is None or not self.route:
            return
        with contextlib.suppress(KlusterError):
            await self.peers.send(self.route[0].peer_id, wire.encode(wire.Close(state.wire_id, self._hops(), 0)))
            self._closed_at = time.monotonic()
            self._receipted_since_close.clear()

    async def _await_receipts(self) -> None:
        """Give the receipts the hops sign on session close time to arrive (see RECEIPT_QUIET_S)."""
        if self._closed_at is None or not self.job:
            return
        hops = {h.peer_id for h in self.route}
        while not hops <= self._receipted_since_close:
            now = time.monotonic()
            if now - self._closed_at > RECEIPT_WAIT_S:
                break
            if now - max(self._closed_at, self._last_receipt_at) > RECEIPT_QUIET_S:
                break
            await asyncio.sleep(0.02)

    async def shutdown(self) -> None:
        self._stopping = True
        if self.spot is not None:
            await self.spot.close()
        await self._await_receipts()
        if self.peers is not None:
            await self.peers.shutdown()
        await self.signaling.shutdown()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
