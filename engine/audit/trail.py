"""A node's audit trail: per session, a sketch of every position it received and sent, for spot checks.

The node records as it serves (on the torch thread; two ``(T, hidden) @ (hidden, 8)`` products per
step) and answers the coordinator's ``audit_query`` from the trail. It cannot know which session
or step will be checked, nor when: a check may come after the session closed, so trails outlive
their sessions (the oldest are dropped past ``max_sessions``). The first hop's input is token ids,
kept as they are: they are the history the coordinator's reference recomputes from.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from engine.audit.sketch import MAX_AUDIT_POSITIONS, RECEIVED, SENT, encode_rows, projection, sketch
from engine.models.sampling import SamplingParams

log = logging.getLogger(__name__)

#: sessions whose trails a node keeps (~64 KB each at most: MAX_AUDIT_POSITIONS x 2 x 32 bytes)
MAX_SESSIONS = 256


@dataclass
class _SessionTrail:
    tokens: list[int] = field(default_factory=list)
    received: list[torch.Tensor] = field(default_factory=list)
    sent: list[torch.Tensor] = field(default_factory=list)
    #: positions recorded; past MAX_AUDIT_POSITIONS the session is no longer auditable
    length: int = 0
    codec: str = "fp32"
    overflow: bool = False
    #: the last hop's: how it was asked to pick tokens (None: not the last hop; "mixed": it changed)
    sampling: SamplingParams | str | None = None


def _cut(parts: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    if not parts:
        return parts
    rows = torch.cat(parts)[:keep]
    return [rows] if len(rows) else []


class AuditTrail:
    """Sketches of what this node received and sent, per session. Torch thread only."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS) -> None:
        self._key: bytes | None = None
        self._proj: dict[tuple[str, int], torch.Tensor] = {}
        self._sessions: OrderedDict[str, _SessionTrail] = OrderedDict()
        self.max_sessions = max_sessions

    def set_key(self, key: bytes) -> None:
        """The projection key the coordinator gave this node (a new key starts the trails afresh)."""
        if key != self._key:
            self._key = key
            self._proj.clear()
            self._sessions.clear()

    def _projection(self, direction: str, hidden: int) -> torch.Tensor:
        if self._key is None:
            raise RuntimeError("no audit key")
        proj = self._proj.get((direction, hidden))
        if proj is None:
            proj = self._proj[(direction, hidden)] = projection(self._key, direction, hidden)
        return proj

    def record(
        self,
        session: str,
        pos: int,
        received: torch.Tensor,
        sent: torch.Tensor | None,
        codec: str,
        sampling: SamplingParams | None = None,
    ) -> None:
        """Positions ``pos..pos+T`` of ``session``: the input as received and the hidden state sent on
        (None at the last hop, whose output is a token the client and the first hop both see).

        ``sampling``: at the last hop, how it was asked to pick the token; the coordinator checks
        tokens against what the node says it was asked, and that against what the client says."""
        if self._key is None:
            return
        trail = self._sessions.get(session)
        if trail is None:
            if pos != 0:
                return  # began before we had a key: not auditable
            trail = self._sessions[session] = _SessionTrail(codec=codec)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(session)
        if trail.overflow:
            return
        if pos < trail.length:  # a rewind (rejected drafts): those positions are gone from the cache too
            del trail.tokens[pos:]
            trail.received, trail.sent = _cut(trail.received, pos), _cut(trail.sent, pos)
            trail.length = pos
        if pos != trail.length:
            trail.overflow = True  # a gap: should not happen; the session is no longer auditable
            return
        if received.is_floating_point():
            trail.received.append(sketch(received, self._projection(RECEIVED, received.shape[-1])))
            positions = trail.received[-1].shape[0]
        else:
            ids = received.reshape(-1).tolist()
            trail.tokens.extend(int(i) for i in ids)
            positions = len(ids)
        if sent is not None:
            trail.sent.append(sketch(sent, self._projection(SENT, sent.shape[-1])))
        if sampling is not None:
            trail.sampling = sampling if trail.sampling in (None, sampling) else "mixed"
        trail.length += positions
        if trail.length > MAX_AUDIT_POSITIONS:
            trail.overflow = True
            trail.tokens, trail.received, trail.sent = [], [], []

    def report(self, session: str, positions: int) -> dict[str, Any]:
        """The trail's first ``positions`` positions as an ``audit_reply`` body (``missing`` if it cannot)."""
        trail = self._sessions.get(session)
        if trail is None:
            return {"missing": "no trail for this session (unknown, too old, or begun before the audit key)"}
        if trail.overflow:
            return {"missing": f"the session outgrew the {MAX_AUDIT_POSITIONS} positions a trail keeps"}
        if not 0 < positions <= trail.length:
            return {"missing": f"the trail holds {trail.length} positions, {positions} asked"}
        body: dict[str, Any] = {"positions": positions, "codec": trail.codec}
        if trail.tokens:
            body["tokens"] = trail.tokens[:positions]
        if trail.received:
            body["received"] = encode_rows(torch.cat(trail.received)[:positions])
        if trail.sent:
            body["sent"] = encode_rows(torch.cat(trail.sent)[:positions])
        if trail.sampling is not None:
            body["sampling"] = asdict(trail.sampling) if isinstance(trail.sampling, SamplingParams) else trail.sampling
        return body
