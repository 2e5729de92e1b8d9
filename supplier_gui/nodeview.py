"""The node as the app knows it from its events: a pure reducer ``apply_event(view, event)``.

Fed by the JSON lines of ``kluster node --events-jsonl`` (see engine.node.events); the dashboard
lists ``sessions`` (jobs being served, with tokens/s) and the tray counts them. A new process
starts from ``NodeView()`` again: nothing is carried over from a crashed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class SessionView:
    session: str
    model_id: str
    layers: tuple[int, int]
    tokens: int = 0
    tokens_per_s: float | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class NodeView:
    #: "", registered, assigned, ready, draining, drained, stopped
    phase: str = ""
    peer_id: str = ""
    model_id: str = ""
    layers: tuple[int, int] | None = None
    sessions: dict[str, SessionView] = field(default_factory=dict)
    #: sessions finished since the process started, and their tokens
    finished: int = 0
    finished_tokens: int = 0
    #: the last finished session (the dashboard keeps showing its rate)
    last: SessionView | None = None
    error: str = ""


def _layers(raw: Any) -> tuple[int, int] | None:
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) for x in raw):
        return (raw[0], raw[1])
    return None


def _session(view: NodeView, ev: dict[str, Any]) -> SessionView:
    sid = str(ev.get("session"))
    old = view.sessions.get(sid) or SessionView(sid, str(ev.get("model_id", "")), _layers(ev.get("layers")) or (0, 0))
    rate = ev.get("tokens_per_s")
    return replace(
        old,
        model_id=str(ev.get("model_id") or old.model_id),
        layers=_layers(ev.get("layers")) or old.layers,
        tokens=int(ev.get("tokens", old.tokens) or 0),
        tokens_per_s=float(rate) if isinstance(rate, int | float) else old.tokens_per_s,
        seconds=float(ev.get("seconds", old.seconds) or 0.0),
    )


def apply_event(view: NodeView, ev: dict[str, Any]) -> NodeView:
    kind = ev.get("event")
    if kind == "registered":
        return replace(view, phase="registered", peer_id=str(ev.get("peer_id", "")), error="")
    if kind == "assigned":
        return replace(view, phase="assigned" if view.phase != "ready" else "ready", model_id=str(ev.get("model_id")))
    if kind == "ready":
        layers = _layers(ev.get("layers"))
        return replace(view, phase="ready", model_id=str(ev.get("model_id")), layers=layers, error="")
    if kind in ("session_start", "session_progress"):
        s = _session(view, ev)
        return replace(view, sessions={**view.sessions, s.session: s})
    if kind == "session_end":
        s = _session(view, ev)
        rest = {k: v for k, v in view.sessions.items() if k != s.session}
        return replace(
            view, sessions=rest, finished=view.finished + 1, finished_tokens=view.finished_tokens + s.tokens, last=s
        )
    if kind in ("draining", "drained"):
        return replace(view, phase=kind)
    if kind == "stopped":
        return replace(view, phase="stopped", sessions={})
    if kind == "error":
        return replace(view, error=str(ev.get("message", "error")))
    return view
