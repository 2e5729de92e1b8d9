"""Round-trip estimation and a delay-driven congestion window for our SCTP sender (pure, no I/O).

Why not aiortc's own: it runs TCP Reno, halving its window on every loss. On a 1 % lossy path
with an 80 ms round trip Reno's window settles near 20 packets whatever the link's capacity
(Mathis: rate ~ MSS / RTT * 1.22 / sqrt(p) ~ 0.2 MB/s), and home links do lose packets that no
queue dropped. This window treats *queueing delay* as the congestion signal instead: it grows
while the smallest round trip of the last round stays near the path's minimum, shrinks in
proportion to the standing queue once that queue passes a threshold, and backs off on loss only
when losses are too many to be random (a policer or a shallow buffer overflowing, which shows
no delay). So it still yields to competing traffic (their queue is our delay) while random loss
costs only the retransmitted packet.

Times are seconds (any monotonic clock); sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bounds of the retransmission timeout. aiortc's 1 s minimum (RFC 4960) turns every tail loss
#: into a one-second stall; 200 ms is Linux TCP's minimum. The start value is RFC 6298's 1 s.
RTO_MIN_S = 0.2
RTO_INITIAL_S = 1.0
RTO_MAX_S = 60.0
_ALPHA = 1 / 8
_BETA = 1 / 4

#: RTT samples of a round after which slow start may end early (HyStart++'s N_RTT_SAMPLE).
HYSTART_SAMPLES = 8

#: How long a path-minimum RTT sample is trusted (a route change must be able to raise it).
MIN_RTT_WINDOW_S = 10.0


class RttEstimator:
    """Smoothed RTT, its variance and the RTO (RFC 6298), plus the path's minimum RTT.

    The minimum is kept over a sliding window of :data:`MIN_RTT_WINDOW_S` (two half-window
    buckets), so it follows a path that got longer instead of remembering the best ever.
    """

    def __init__(
        self, rto_min: float = RTO_MIN_S, rto_initial: float = RTO_INITIAL_S, rto_max: float = RTO_MAX_S
    ) -> None:
        if not 0 < rto_min <= rto_max or rto_initial <= 0:
            raise ValueError("need 0 < rto_min <= rto_max and rto_initial > 0")
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.rto = min(max(rto_initial, rto_min), rto_max)
        self.srtt: float | None = None
        self.rttvar = 0.0
        self._min_now = float("inf")
        self._min_prev = float("inf")
        self._bucket_start: float | None = None

    @property
    def min_rtt(self) -> float | None:
        best = min(self._min_now, self._min_prev)
        return None if best == float("inf") else best

    def sample(self, rtt: float, now: float) -> None:
        """Feed one unambiguous RTT measurement (a chunk acknowledged after its only transmission)."""
        if rtt < 0:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - rtt)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * rtt
        self.rto = min(max(self.srtt + 4 * self.rttvar, self.rto_min), self.rto_max)
        if self._bucket_start is None:
            self._bucket_start = now
        elif now - self._bucket_start >= MIN_RTT_WINDOW_S / 2:
            self._min_prev, self._min_now, self._bucket_start = self._min_now, float("inf"), now
        self._min_now = min(self._min_now, rtt)

    def backoff(self) -> None:
        """A retransmission timeout fired: double the RTO (RFC 6298 5.5) until the next sample."""
        self.rto = min(self.rto * 2, self.rto_max)


@dataclass(frozen=True, slots=True)
class WindowConfig:
    """Knobs of :class:`DelayWindow`; the defaults are what the transport bench settled on."""

    mtu: int
    #: Window at start (RFC 4960 allows 4 MTUs; we start bigger, the path is probed within a round).
    initial_packets: int = 10
    min_packets: int = 4
    #: Largest window, a guard against runaway growth on a path that never shows delay.
    max_bytes: int = 16 * 1024 * 1024
    #: Queueing delay below which the window grows, and above which it shrinks: absolute floors
    #: and fractions of the path's minimum RTT, whichever is larger.
    grow_below_s: float = 0.003
    grow_below_frac: float = 0.1
    shrink_above_s: float = 0.015
    shrink_above_frac: float = 0.3
    #: Queueing delay that ends slow start (HyStart's delay test: min RTT / 8, at least 8 ms).
    exit_slow_start_s: float = 0.008
    exit_slow_start_frac: float = 1 / 8
    #: Growth per round outside slow start (a fraction of the window, at least one MTU) below
    #: the lower threshold, and in packets between the thresholds.
    growth: float = 1 / 8
    probe_packets: int = 4
    #: Losses in one round above this fraction of the packets acknowledged in it (and above
    #: ``loss_min_count``) count as congestion even without delay.
    loss_limit: float = 0.05
    loss_min_count: int = 3
    #: Multiplicative decrease for such a loss round and for a retransmission timeout.
    loss_backoff: float = 0.7


class DelayWindow:
    """The congestion window (``cwnd`` bytes) of one association, driven by ACKs, RTTs and losses.

    Call :meth:`on_ack` for every SACK that acknowledged something, :meth:`on_loss` for packets
    declared lost, :meth:`on_timeout` when the retransmission timer fires. Decisions are taken
    once per *round* (one smoothed RTT): the round's smallest RTT sample minus the path minimum
    is the standing queue, immune to single delayed ACKs and scheduler hiccups.
    """

    def __init__(self, config: WindowConfig) -> None:
        self.cfg = config
        self.cwnd = config.initial_packets * config.mtu
        self.slow_start = True
        self._round_end: float | None = None
        self._round_min = float("inf")
        self._round_acked = 0
        self._round_lost = 0
        self._round_limited = False
        self._round_samples = 0
        #: Counters for the bench and tests.
        self.rounds = 0
        self.delay_decreases = 0
        self.loss_decreases = 0

    @property
    def min_cwnd(self) -> int:
        return self.cfg.min_packets * self.cfg.mtu

    def _clamp(self, value: float) -> int:
        return int(min(max(value, self.min_cwnd), self.cfg.max_bytes))

    def thresholds(self, min_rtt: float) -> tuple[float, float, float]:
        """(grow below, shrink above, end slow start above) queueing delay in seconds for ``min_rtt``."""
        c = self.cfg
        return (
            max(c.grow_below_s, c.grow_below_frac * min_rtt),
            max(c.shrink_above_s, c.shrink_above_frac * min_rtt),
            max(c.exit_slow_start_s, c.exit_slow_start_frac * min_rtt),
        )

    def restart(self) -> None:
        """The sender was idle for an RTO: start again from the initial window, in slow start."""
        self.cwnd = min(self.cwnd, self.cfg.initial_packets * self.cfg.mtu)
        self.slow_start = True
        self._round_end = None

    def on_ack(
        self, now: float, acked_bytes: int, flight_before: int, rtt_sample: float | None, rtt: RttEstimator
    ) -> None:
        """A SACK acknowledged ``acked_bytes`` new bytes while ``flight_before`` bytes were in flight."""
        mtu = self.cfg.mtu
        # Grow only when the window was the limit: an application sending little must not
        # inflate a window it never tested.
        limited = flight_before + mtu >= self.cwnd
        self._round_limited |= limited
        if rtt_sample is not None:
            self._round_min = min(self._round_min, rtt_sample)
            self._round_samples += 1
            if self.slow_start and limited and self._round_samples >= HYSTART_SAMPLES:
                self._check_slow_start_exit(rtt)
        self._round_acked += max(acked_bytes, 0)
        if self.slow_start and limited and acked_bytes > 0:
            self.cwnd = self._clamp(self.cwnd + acked_bytes)
        if self._round_end is None:
            self._round_end = now + (rtt.srtt or 0.0)
            return
        if now < self._round_end:
            return
        self._end_round(rtt)
        self._round_end = now + (rtt.srtt or 0.0)

    def _end_round(self, rtt: RttEstimator) -> None:
        self.rounds += 1
        min_rtt = rtt.min_rtt
        round_min, acked, lost, limited = self._round_min, self._round_acked, self._round_lost, self._round_limited
        self._round_min, self._round_acked, self._round_lost, self._round_limited = float("inf"), 0, 0, False
        self._round_samples = 0
        packets = max(acked // self.cfg.mtu, 1)
        if lost > self.cfg.loss_min_count and lost > self.cfg.loss_limit * packets:
            self.slow_start = False
            self.loss_decreases += 1
            self.cwnd = self._clamp(self.cwnd * self.cfg.loss_backoff)
            return
        if min_rtt is None or round_min == float("inf"):
            return
        queue = round_min - min_rtt
        grow_below, shrink_above, exit_slow_start = self.thresholds(min_rtt)
        if not limited:
            return  # an application sending little learns nothing about the path; its queue is not ours
        if queue > shrink_above:
            # Keep what the path carries plus the allowed queue: cwnd * (min_rtt + grow_below) / round_min.
            self.slow_start = False
            self.delay_decreases += 1
            self.cwnd = self._clamp(self.cwnd * max((min_rtt + grow_below) / round_min, 0.5))
        elif self.slow_start:
            if queue > exit_slow_start:
                self.slow_start = False  # a queue is forming: hold, and grow gently from now on
        elif queue < grow_below:
            self.cwnd = self._clamp(self.cwnd + max(self.cfg.mtu, self.cwnd * self.cfg.growth))
        else:
            # Between the thresholds: probe gently (delay jitter alone can sit here; a real queue
            # soon pushes past the upper threshold and is drained).
            self.cwnd = self._clamp(self.cwnd + self.cfg.probe_packets * self.cfg.mtu)

    def _check_slow_start_exit(self, rtt: RttEstimator) -> None:
        """HyStart's delay test inside the round (RFC 9406): waiting for the round's end would let
        the window double once more into a full queue."""
        min_rtt = rtt.min_rtt
        if min_rtt is None:
            return
        grow_below, shrink_above, exit_slow_start = self.thresholds(min_rtt)
        queue = self._round_min - min_rtt
        if queue > exit_slow_start:
            self.slow_start = False
            if queue > shrink_above:
                self.delay_decreases += 1
                self.cwnd = self._clamp(self.cwnd * max((min_rtt + grow_below) / self._round_min, 0.5))

    def on_loss(self, packets: int) -> None:
        """``packets`` were declared lost (they are retransmitted; no decrease here by itself)."""
        self._round_lost += packets

    def on_timeout(self) -> None:
        """The retransmission timer fired: nothing was acknowledged for a whole RTO."""
        self.slow_start = False
        self.loss_decreases += 1
        self.cwnd = self._clamp(self.cwnd * 0.5)
