"""The delay-driven congestion window and RTT estimator of our SCTP sender (pure logic)."""

from __future__ import annotations

import pytest

from engine.transport.sctp_cc import (
    HYSTART_SAMPLES,
    MIN_RTT_WINDOW_S,
    RTO_MIN_S,
    DelayWindow,
    RttEstimator,
    WindowConfig,
)

MTU = 1160
PATH_RTT = 0.080


def test_rtt_estimator_follows_rfc6298_and_clamps_the_rto() -> None:
    rtt = RttEstimator()
    assert rtt.rto == 1.0 and rtt.srtt is None and rtt.min_rtt is None
    rtt.sample(0.100, now=0.0)
    assert rtt.srtt == pytest.approx(0.100) and rtt.rttvar == pytest.approx(0.050)
    assert rtt.rto == pytest.approx(0.300)  # srtt + 4 * rttvar
    for _ in range(50):
        rtt.sample(0.010, now=1.0)
    assert rtt.rto == RTO_MIN_S  # a short path still waits the minimum (aiortc: 1 s)
    rtt.backoff()
    assert rtt.rto == pytest.approx(2 * RTO_MIN_S)
    assert rtt.min_rtt == pytest.approx(0.010)


def test_min_rtt_forgets_a_path_that_got_longer() -> None:
    rtt = RttEstimator()
    rtt.sample(0.010, now=0.0)
    t = 1.0
    while t < 2.5 * MIN_RTT_WINDOW_S:
        rtt.sample(0.050, now=t)
        t += 0.5
    assert rtt.min_rtt == pytest.approx(0.050)


def test_rto_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        RttEstimator(rto_min=0)


class Path:
    """Feeds a DelayWindow SACKs as a bulk sender on an 80 ms path would see them."""

    ACKS_PER_RTT = 20

    def __init__(self, window: DelayWindow) -> None:
        self.window = window
        self.rtt = RttEstimator()
        self.rtt.sample(PATH_RTT, 0.0)  # the path minimum is known (handshake)
        self.now = 0.0

    def ack(self, queue_s: float, limited: bool = True) -> None:
        sample = PATH_RTT + queue_s
        w = self.window
        self.now += sample / self.ACKS_PER_RTT
        self.rtt.sample(sample, self.now)
        flight = w.cwnd if limited else w.cwnd // 10
        w.on_ack(self.now, max(w.cwnd // self.ACKS_PER_RTT, 1), flight, sample, self.rtt)

    def round(self, queue_s: float = 0.0, lost: int = 0, limited: bool = True) -> int:
        """Feed SACKs until the window has closed one whole round made of these conditions only
        (so the round before, with older samples, is also closed); returns the window as it was
        just before that round's decision."""
        w = self.window
        start = w.rounds
        before = w.cwnd
        while w.rounds < start + 2:
            if lost and w.rounds == start + 1:
                w.on_loss(lost)
                lost = 0
            before = w.cwnd
            self.ack(queue_s, limited)
        return before


def fresh(**overrides: object) -> Path:
    return Path(DelayWindow(WindowConfig(mtu=MTU, **overrides)))  # type: ignore[arg-type]


def left_slow_start() -> Path:
    """A window past slow start, at a few hundred packets."""
    path = fresh()
    for _ in range(3):
        path.round()
    path.round(queue_s=0.012)
    assert not path.window.slow_start
    return path


def test_slow_start_grows_fast_until_a_queue_shows() -> None:
    path = fresh()
    start = path.window.cwnd
    path.round()
    assert path.window.slow_start and path.window.cwnd >= 3 * start
    path.round(queue_s=0.030)
    assert not path.window.slow_start


def test_slow_start_ends_within_the_round_not_after_it() -> None:
    """HyStart: a few SACKs into a round with a queue, not when the round (and a doubling) is over."""
    path = fresh()
    path.round()
    w = path.window
    acks = 0
    while w.slow_start and acks < Path.ACKS_PER_RTT:
        path.ack(0.050)
        acks += 1
    assert not w.slow_start
    assert acks <= 2 * HYSTART_SAMPLES
    assert w.delay_decreases == 1  # 50 ms of queue is over the shrink threshold: drained at once


def test_random_loss_costs_no_window() -> None:
    path = left_slow_start()
    before = path.window.cwnd
    for _ in range(10):
        path.round(lost=max(path.window.cwnd // MTU // 100, 1))  # ~1 % of each round's packets
    assert path.window.cwnd >= before
    assert path.window.loss_decreases == 0


def test_heavy_loss_without_delay_still_backs_off() -> None:
    """A policer or a shallow buffer drops without queueing: over 5 % of a round is congestion."""
    path = left_slow_start()
    before = path.round(lost=path.window.cwnd // MTU // 5)
    assert path.window.cwnd == int(before * path.window.cfg.loss_backoff)
    assert path.window.loss_decreases == 1


def test_a_standing_queue_shrinks_the_window_in_proportion() -> None:
    path = left_slow_start()
    w = path.window
    before = path.round(queue_s=0.060)
    grow_below, _, _ = w.thresholds(PATH_RTT)
    assert w.cwnd == int(before * (PATH_RTT + grow_below) / (PATH_RTT + 0.060))
    assert w.delay_decreases >= 1


def test_no_queue_grows_an_eighth_per_round_and_jitter_only_probes() -> None:
    path = left_slow_start()
    w = path.window
    before = path.round(queue_s=0.0)
    assert w.cwnd == before + int(before * w.cfg.growth)
    before = path.round(queue_s=0.012)  # between the thresholds: a few packets more
    assert w.cwnd == before + w.cfg.probe_packets * MTU


def test_an_application_sending_little_neither_grows_nor_shrinks_the_window() -> None:
    path = fresh()
    before = path.window.cwnd
    for _ in range(3):
        path.round(limited=False)
    path.round(queue_s=0.100, limited=False)  # someone else's queue
    assert path.window.cwnd == before
    assert path.window.slow_start


def test_timeout_halves_restart_returns_to_slow_start() -> None:
    path = left_slow_start()
    w = path.window
    big = w.cwnd
    w.on_timeout()
    assert w.cwnd == big // 2 and not w.slow_start
    w.restart()
    assert w.cwnd == w.cfg.initial_packets * MTU and w.slow_start
    for _ in range(100):
        w.on_timeout()
    assert w.cwnd == w.min_cwnd
