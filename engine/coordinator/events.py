"""An in-process hub of job and grid events for watchers (the TUI, through ``GET /v1/events``).

``publish`` never blocks and never fails for a watcher's sake: each subscriber has a bounded
buffer, and a slow one loses its oldest events, then receives one ``stream.dropped`` event saying
how many, so it knows to re-read ``/v1/jobs`` and ``/v1/nodes``. The last events are kept so a
watcher that reconnects with the last ``seq`` it saw (SSE ``Last-Event-ID``) misses nothing.

Call everything from the event loop's thread (``publish`` wakes subscribers through asyncio).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

JOB_QUEUED = "job.queued"
JOB_STARTED = "job.started"
JOB_DONE = "job.done"
JOB_FAILED = "job.failed"
JOB_CANCELLED = "job.cancelled"
NODE_JOINED = "node.joined"
NODE_LEFT = "node.left"
NODE_READY = "node.ready"
NODE_DRAINING = "node.draining"
#: a spot check caught a node returning wrong work: it is disconnected for good
NODE_BANNED = "node.banned"
#: a countersigned work receipt was credited (``engine.coordinator.billing``): earnings changed
LEDGER_CREDIT = "ledger.credit"
#: sent to one subscriber only, before its next event, when its buffer overflowed
STREAM_DROPPED = "stream.dropped"

KINDS = frozenset(
    {
        JOB_QUEUED,
        JOB_STARTED,
        JOB_DONE,
        JOB_FAILED,
        JOB_CANCELLED,
        NODE_JOINED,
        NODE_LEFT,
        NODE_READY,
        NODE_DRAINING,
        NODE_BANNED,
        LEDGER_CREDIT,
    }
)

Event = dict[str, Any]


class Subscription:
    """One watcher's bounded buffer; read it with ``next``."""

    def __init__(self, maxsize: int) -> None:
        self._buf: deque[Event] = deque()
        self._maxsize = maxsize
        self._wake = asyncio.Event()
        #: events lost to overflow since this subscription began
        self.dropped = 0
        self._unreported = 0
        self.closed = False

    def push(self, event: Event) -> None:
        if len(self._buf) >= self._maxsize:
            self._buf.popleft()
            self.lost(1)
        self._buf.append(event)
        self._wake.set()

    def lost(self, count: int) -> None:
        """Record events this subscriber will never see (reported before its next event)."""
        self.dropped += count
        self._unreported += count
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event; None after ``timeout`` s with nothing, or once closed and drained."""
        if not self._buf and not self._unreported and not self.closed:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None
        if self._unreported:
            count, self._unreported = self._unreported, 0
            return {"kind": STREAM_DROPPED, "ts": time.time(), "count": count}
        return self._buf.popleft() if self._buf else None


class EventHub:
    """Fan-out of events to subscribers, plus a short history for reconnecting watchers."""

    def __init__(self, history: int = 256, clock: Callable[[], float] = time.time) -> None:
        self._subs: set[Subscription] = set()
        self._history: deque[Event] = deque(maxlen=history)
        self._seq = 0
        self._clock = clock
        self._closed = False

    def publish(self, kind: str, **fields: Any) -> Event:
        """Send an event to every subscriber now; ``kind`` is one of ``KINDS``."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")  # a caller's bug, not a user's mistake
        self._seq += 1
        event: Event = {**fields, "kind": kind, "seq": self._seq, "ts": self._clock()}
        self._history.append(event)
        for sub in self._subs:
            sub.push(event)
        return event

    def node_event(self, kind: str, peer_id: str, name: str | None = None, **extra: Any) -> Event:
        """A grid event (``node.*``): the coordinator calls this as nodes come and go (name when it knows it)."""
        if not kind.startswith("node."):
            raise ValueError(f"not a node event kind: {kind!r}")
        return self.publish(kind, peer_id=peer_id, name=name, **extra)

    @contextmanager
    def subscribe(self, maxsize: int = 256, after: int | None = None) -> Iterator[Subscription]:
        """A subscription for the ``with`` block; ``after`` replays kept events with a larger seq."""
        sub = Subscription(maxsize)
        if after is not None:
            kept = [e for e in self._history if e["seq"] > after]
            if after > self._seq:  # a seq from a previous coordinator run: everything may have changed
                sub.lost(1)
            elif (missed := (kept[0]["seq"] if kept else self._seq + 1) - after - 1) > 0:
                sub.lost(missed)  # older than the history reaches
            for event in kept:
                sub.push(event)
        if self._closed:
            sub.close()
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    def close(self) -> None:
        """End every stream (coordinator shutdown); later subscriptions start closed."""
        self._closed = True
        for sub in self._subs:
            sub.close()
