"""A node's state changes as JSON lines (``kluster node --events-jsonl PATH|-``), for a local supervisor.

The supplier tray app (``supplier_gui``) runs ``kluster node`` as a child process and needs to know
what it is doing without asking the coordinator (which may be unreachable, or need a session):
one JSON object per line on the node's stdout is the simplest local channel there is, needs no
port, and dies with the process. Events, each with ``event`` and ``t`` (Unix seconds):

  registered      {name, peer_id}                    connected to the coordinator
  assigned        {model_id, units}                  told which fragments to host
  ready           {model_id, layers}                 loaded and serving them
  session_start   {session, model_id, layers}        the first step of a session ran here
  session_progress {session, tokens, steps, seconds, tokens_per_s}  every few seconds while live
  session_end     {session, tokens, steps, seconds, tokens_per_s, reason}   closed or idle
  draining        {sessions}                         asked to stop: no new sessions
  drained         {sessions_left}                    live sessions finished (or the timeout hit)
  error           {message}                          a failure the user should see
  stopped         {}                                 the process is about to exit (the last line)

``tokens`` counts positions that went through this node's layers (prompt and generated alike).
Writing never raises into the node: a closed pipe (supervisor gone) switches the sink off.
Steps arrive on the torch thread and the rest on the event loop, hence the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from engine.errors import ConfigError

log = logging.getLogger(__name__)

#: a session with no step for this long is reported ended (its client vanished without a Close)
SESSION_IDLE_S = 30.0


@dataclass
class _Session:
    model_id: str
    layers: tuple[int, int]
    started: float
    last: float
    tokens: int = 0
    steps: int = 0


class EventSink:
    """Writes events to ``stream`` (None: a silent sink, the default of every node)."""

    def __init__(self, stream: TextIO | None = None, *, owned: bool = False) -> None:
        self._stream = stream
        self._owned = owned
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    @classmethod
    def open(cls, target: str | None) -> EventSink:
        """``-``: stdout; a path: appended to (created); None: silent."""
        if target is None:
            return cls()
        if target == "-":
            return cls(sys.stdout)
        try:
            return cls(Path(target).open("a", encoding="utf-8", buffering=1), owned=True)
        except OSError as exc:
            raise ConfigError(f"cannot open the events file {target}: {exc}") from None

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def emit(self, event: str, **fields: Any) -> None:
        if self._stream is None:
            return
        line = json.dumps({"event": event, "t": round(time.time(), 3), **fields}, default=str)
        with self._lock:
            self._write(line)

    def _write(self, line: str) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:  # the reader went away: keep serving, stop reporting
            log.warning("events channel closed (%s); no more events are written", exc)
            self._stream = None

    @contextlib.contextmanager
    def reporting_errors(self) -> Iterator[None]:
        """Emit ``error`` for an exception leaving the block (then let it go on: the CLI reports it too)."""
        try:
            yield
        except Exception as exc:
            self.emit("error", message=str(exc) or type(exc).__name__, kind=type(exc).__name__)
            raise

    def step(self, session: str, tokens: int, model_id: str, layers: tuple[int, int]) -> None:
        """One step of ``session`` ran here over ``tokens`` positions (the first one starts it)."""
        if self._stream is None:
            return
        now = time.monotonic()
        with self._lock:
            s = self._sessions.get(session)
            if s is None:
                s = self._sessions[session] = _Session(model_id, layers, now, now)
                self._write(self._line("session_start", session=session, model_id=model_id, layers=list(layers)))
            s.tokens += tokens
            s.steps += 1
            s.last = now

    def session_closed(self, session: str, reason: str = "closed") -> None:
        with self._lock:
            s = self._sessions.pop(session, None)
            if s is not None:
                self._write(self._end_line(session, s, reason))

    def sweep(self) -> None:
        """Called every few seconds by the node: progress of live sessions, idle ones reported ended."""
        now = time.monotonic()
        with self._lock:
            for session, s in list(self._sessions.items()):
                if now - s.last > SESSION_IDLE_S:
                    del self._sessions[session]
                    self._write(self._end_line(session, s, "idle"))
                else:
                    self._write(self._line("session_progress", session=session, **_totals(s)))

    def live_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        """End every open session, say ``stopped``, then release the stream if we opened it. Idempotent."""
        with self._lock:
            for session, s in list(self._sessions.items()):
                self._write(self._end_line(session, s, "stopped"))
            self._sessions.clear()
            if self._stream is not None:
                self._write(self._line("stopped"))
            stream, self._stream = self._stream, None
        if stream is not None and self._owned:
            stream.close()

    @staticmethod
    def _line(event: str, **fields: Any) -> str:
        return json.dumps({"event": event, "t": round(time.time(), 3), **fields})

    def _end_line(self, session: str, s: _Session, reason: str) -> str:
        return self._line(
            "session_end", session=session, model_id=s.model_id, layers=list(s.layers), reason=reason, **_totals(s)
        )


def _totals(s: _Session) -> dict[str, Any]:
    seconds = max(s.last - s.started, 0.0)
    rate = s.tokens / seconds if seconds > 0 else None
    return {
        "tokens": s.tokens,
        "steps": s.steps,
        "seconds": round(seconds, 3),
        "tokens_per_s": None if rate is None else round(rate, 2),
    }
