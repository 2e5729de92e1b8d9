"""Tokens per second in one-second buckets: what the sparklines draw.

A bucket per wall-clock second (not an exponential average) so a stall shows as zeros in the
sparkline instead of a slow decay, and a failover's pause is visible where it happened.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RateMeter:
    """Counts added at times (seconds); read back as per-second rates."""

    #: how many seconds of history are kept
    span_s: int = 120
    _buckets: deque[tuple[int, float]] = field(default_factory=deque)

    def add(self, count: float, now: float) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1] = (second, self._buckets[-1][1] + count)
        else:
            self._buckets.append((second, count))
        while self._buckets and self._buckets[0][0] <= second - self.span_s:
            self._buckets.popleft()

    def series(self, now: float, seconds: int = 60) -> list[float]:
        """Tokens in each of the last ``seconds`` whole seconds, oldest first (the current one last)."""
        end = int(now)
        counts = dict(self._buckets)
        return [counts.get(s, 0.0) for s in range(end - seconds + 1, end + 1)]

    def rate(self, now: float, window_s: int = 5) -> float:
        """Mean tokens/s over the last ``window_s`` complete seconds."""
        values = self.series(now, window_s + 1)[:-1]
        return sum(values) / window_s if values else 0.0
