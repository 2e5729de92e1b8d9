"""Runs one loaded fragment for many sessions: per-session KV caches, bounded memory, off the loop.

Steps run one at a time on the process's torch thread (see ``torch_thread``): torch already uses
every core for one matmul, and running two sessions' steps at once would only make both slower
and their timings meaningless. The asyncio loop stays free to move other sessions' bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine.errors import CapacityError, ProtocolError, SessionError, SessionLostError
from engine.fragments import torch_thread
from engine.models.kv_cache import KVCache
from engine.models.llama import FragmentModel
from engine.models.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutorConfig:
    #: memory reserved for KV caches of all sessions together, in bytes
    kv_budget_bytes: int = 1 << 30
    #: a session untouched for this long is dropped (its client is presumed gone)
    session_idle_s: float = 600.0
    #: longest context a session may ask for
    max_context: int = 8192


@dataclass
class _Session:
    cache: KVCache
    reserved: int
    #: absolute layer this session's route enters the fragment at (fixed for the session's life)
    first: int
    #: absolute layers this session's activation budget skips (fixed for the session's life)
    skip: frozenset[int] = frozenset()
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class StepOutput:
    """A step's result: hidden states for the next hop, or the sampled token at the last hop."""

    hidden: torch.Tensor | None
    token_id: int | None
    queue_ms: float
    compute_ms: float
    #: verify steps: the greedy token after each position of the step (``token_id`` is the last)
    tokens: tuple[int, ...] = ()


class FragmentExecutor:
    """Executes steps of sessions on one ``FragmentModel``."""

    def __init__(self, model: FragmentModel, config: ExecutorConfig | None = None) -> None:
        self.model = model
        self.config = config or ExecutorConfig()
        self._sessions: dict[str, _Session] = {}
        self._device = next(model.parameters()).device
        #: set when the node leaves: live sessions finish, new ones are refused (and fail over)
        self.draining = False

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved for s in self._sessions.values())

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self._sessions.items() if now - s.last_used > self.config.session_idle_s]:
            log.info("dropping idle session %s", sid)
            del self._sessions[sid]

    def _open(self, session: str, max_tokens: int, first: int, skip: frozenset[int] = frozenset()) -> _Session:
        cfg = self.model.cfg
        if max_tokens > min(self.config.max_context, cfg.max_position_embeddings):
            raise SessionError(
                f"requested context of {max_tokens} tokens exceeds this node's limit of "
                f"{min(self.config.max_context, cfg.max_position_embeddings)}"
            )
        dtype = next(self.model.parameters()).dtype
        # Layers before ``first`` never run for this session, so their cache slots stay unallocated.
        layers = self.model.end - first
        need = KVCache.bytes_for(layers, cfg.num_key_value_heads, cfg.head_dim, max_tokens, dtype)
        self._expire_idle()
        if self.reserved_bytes + need > self.config.kv_budget_bytes:
            raise CapacityError(
                f"node is full: {self.sessions} sessions hold {self.reserved_bytes / 2**20:.1f} MiB of its "
                f"{self.config.kv_budget_bytes / 2**20:.1f} MiB KV budget; this session needs {need / 2**20:.1f} MiB"
            )
        state = _Session(self.model.new_cache(max_tokens), need, first, skip)
        self._sessions[session] = state
        return state

    def check_input(self, tensor: torch.Tensor, first: int | None = None) -> torch.Tensor:
        """Refuse inputs that do not fit this fragment (shape, dtype, token range) before any compute.

        Token ids are expected only when the step starts at the fragment's embeddings; a step
        entering at a later ``first`` layer takes hidden states.
        """
        cfg = self.model.cfg
        if self.model.has_embed and (first is None or first == self.model.start):
            if tensor.dtype != torch.int64 or tensor.dim() != 1 or tensor.numel() == 0:
                raise ProtocolError("the first fragment takes a 1-D int64 tensor of token ids")
            if int(tensor.min()) < 0 or int(tensor.max()) >= cfg.vocab_size:
                raise ProtocolError(f"token id outside the vocabulary of {cfg.vocab_size}")
            return tensor.unsqueeze(0)
        if not tensor.is_floating_point() or tensor.dim() != 2 or tensor.shape[1] != cfg.hidden_size:
            raise ProtocolError(f"expected hidden states of shape [tokens, {cfg.hidden_size}]")
        if tensor.shape[0] == 0:
            raise ProtocolError("empty hidden-state tensor")
        return tensor.unsqueeze(0)

    def step_sync(
        self,
        session: str,
        pos: int,
        tensor: torch.Tensor,
        max_tokens: int,
        sampling: SamplingParams | None = None,
        queued: float | None = None,
        chunks: tuple[int, ...] = (),
        first: int | None = None,
        skip: frozenset[int] = frozenset(),
        verify: bool = False,
    ) -> StepOutput:
        """Run positions ``pos..pos+T`` of ``session``; a new session must start at position 0.

        ``skip`` names absolute layers the session's activation budget leaves out (the residual
        stream passes them unchanged; fixed per session, so the KV cache stays consistent).
        ``verify`` is a self-speculative check: the step may restart at an earlier position than
        the cache holds (the client rejected drafted tokens: their keys and values are dropped),
        and the last hop returns the greedy token after every position, not just the last.

        ``first`` is the absolute layer the session's route enters this fragment at (default its
        start): routes may join a node's span part-way, and then only layers ``first..end`` run.

        ``chunks`` splits the T tokens into successive steps of those sizes, exactly as if they
        had arrived one step at a time (a failover replays a session this way). Must run on the
        torch thread (``step`` takes it there); ``queued`` is the ``time.perf_counter()`` at which
        the caller handed the work over, for the queue timing.
        """
        t0 = time.perf_counter()
        begin = self.model.start if first is None else first
        if not self.model.start <= begin < max(self.model.end, self.model.start + 1):
            raise ProtocolError(f"layer {begin} is outside this node's layers {self.model.start}-{self.model.end}")
        x = self.check_input(tensor, begin).to(self._device)
        state = self._sessions.get(session)
        limit = max_tokens if state is None else state.cache.max_tokens
        if pos + x.shape[1] > limit:
            raise SessionError(f"session {session} exceeds its declared {limit} tokens")
        if state is None:
            if pos != 0:
                raise SessionLostError(f"unknown session {session} (expired, or this node restarted)")
            if self.draining:
                raise SessionLostError("node is draining: it takes no new sessions")
            state = self._open(session, max_tokens, begin, skip)
        if begin != state.first:
            raise ProtocolError(f"session {session} entered at layer {state.first}, this step at layer {begin}")
        if skip != state.skip:
            raise ProtocolError(f"session {session} changed its skipped layers mid-session")
        if verify and pos < state.cache.length:
            state.cache.truncate(pos)
        if pos != state.cache.length:
            raise SessionError(f"session {session}: got position {pos}, expected {state.cache.length}")
        sizes = chunks or (x.shape[1],)
        if sum(sizes) != x.shape[1]:
            raise ProtocolError(f"chunks {list(sizes)[:8]} do not add up to the {x.shape[1]} tokens sent")
        state.last_used = time.monotonic()
        outs, start = [], 0
        for size in sizes:
            part = x[:, start : start + size]
            outs.append(self.model(part, pos + start, state.cache, first=begin, skip=skip, all_logits=verify))
            start += size
        out = outs[0] if len(outs) == 1 else outs[-1] if self.model.has_head else torch.cat(outs, dim=1)
        token, tokens = None, ()
        hidden: torch.Tensor | None = out[0]
        if self.model.has_head:
            if verify:  # greedy only: the client compares its draft with these
                tokens = tuple(int(t) for t in out[0].argmax(dim=-1))
                token = tokens[-1]
            else:
                token = sample(out[0, -1], sampling or SamplingParams(), pos + x.shape[1])
            hidden = None
        queue_ms = (t0 - queued) * 1000 if queued is not None else 0.0
        return StepOutput(hidden, token, queue_ms, (time.perf_counter() - t0) * 1000, tokens)

    async def step(
        self,
        session: str,
        pos: int,
        tensor: torch.Tensor,
        max_tokens: int,
        sampling: SamplingParams | None = None,
        chunks: tuple[int, ...] = (),
        first: int | None = None,
        skip: frozenset[int] = frozenset(),
        verify: bool = False,
    ) -> StepOutput:
        """``step_sync`` on the torch thread, awaited from the event loop."""
        return await torch_thread.run(
            self.step_sync, session, pos, tensor, max_tokens, sampling, time.perf_counter(), chunks, first, skip, verify
        )

    def warm_up(self, tokens: int = 8, steps: int = 3) -> None:
        """Run a throwaway prefill and a few decode steps (on the torch thread) before serving.

        The first passes through a freshly loaded model pay one-off costs (OpenMP team start,
        allocator growth, cold caches); a user's first request should not.
        """
        cfg = self.model.cfg
        gen = torch.Generator().manual_seed(0)

        def feed(n: int) -> torch.Tensor:
            if self.model.has_embed:
                return torch.randint(0, cfg.vocab_size, (n,), generator=gen)
            return torch.randn(n, cfg.hidden_size, generator=gen) * 0.1

        session = "__warm_up__"
        try:
            self.step_sync(session, 0, feed(tokens), tokens + steps)
            for i in range(steps):
                self.step_sync(session, tokens + i, feed(1), tokens + steps)
        finally:
            self.close_session(session)

    def active_sessions(self, within_s: float = 5.0) -> int:
        """Sessions used in the last ``within_s`` seconds (a vanished client's session is not live)."""
        now = time.monotonic()
        return sum(1 for s in self._sessions.values() if now - s.last_used <= within_s)

    def has_session(self, session: str) -> bool:
        """Whether ``session`` holds a cache here (a node keeps an old span alive for such sessions)."""
        return session in self._sessions

    def close_session(self, session: str) -> bool:
        return self._sessions.pop(session, None) is not None

    async def shutdown(self) -> None:
        self._sessions.clear()
