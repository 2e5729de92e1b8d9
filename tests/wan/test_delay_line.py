"""The delayer's FIFO logic, with fake packets (no root needed): order, timing, seeded loss."""

from __future__ import annotations

import asyncio

import pytest

from engine.wanemu.delayer import DelayLine


class FakePacket:
    def __init__(self, seq: int, log: list[tuple[str, int, float]], loop: asyncio.AbstractEventLoop) -> None:
        self.seq, self._log, self._loop = seq, log, loop

    def accept(self) -> None:
        self._log.append(("accept", self.seq, self._loop.time()))

    def drop(self) -> None:
        self._log.append(("drop", self.seq, self._loop.time()))


async def test_fixed_delay_keeps_order_and_never_releases_early() -> None:
    loop = asyncio.get_running_loop()
    log: list[tuple[str, int, float]] = []
    line = DelayLine(loop, delay_s=0.05, loss=0.0, seed=0)
    sent: dict[int, float] = {}
    for seq in range(200):
        sent[seq] = loop.time()
        line.submit(FakePacket(seq, log, loop))
        if seq % 20 == 0:
            await asyncio.sleep(0.001)
    assert log == [], "nothing leaves before the delay"
    await asyncio.sleep(0.15)
    assert [seq for verdict, seq, _ in log] == list(range(200))
    assert all(verdict == "accept" and t - sent[seq] >= 0.05 for verdict, seq, t in log)
    assert max(t - sent[seq] for _, seq, t in log) < 0.1
    assert (line.accepted, line.dropped) == (200, 0)


async def test_lowering_the_delay_never_lets_a_packet_overtake() -> None:
    loop = asyncio.get_running_loop()
    log: list[tuple[str, int, float]] = []
    line = DelayLine(loop, delay_s=0.1, loss=0.0, seed=0)
    line.submit(FakePacket(0, log, loop))
    line.configure(0.0, 0.0)
    line.submit(FakePacket(1, log, loop))
    assert log == []
    await asyncio.sleep(0.15)
    assert [seq for _, seq, _ in log] == [0, 1]


async def test_loss_is_seeded_and_near_the_fraction() -> None:
    loop = asyncio.get_running_loop()

    def dropped(seed: int) -> list[int]:
        log: list[tuple[str, int, float]] = []
        line = DelayLine(loop, delay_s=0.0, loss=0.1, seed=seed)
        for seq in range(10_000):
            line.submit(FakePacket(seq, log, loop))
        return [seq for verdict, seq, _ in log if verdict == "drop"]

    first = dropped(7)
    assert first == dropped(7), "the same seed drops the same packets"
    assert first != dropped(8)
    assert 850 <= len(first) <= 1150  # mean 1000, sd 30


async def test_flush_releases_everything_held() -> None:
    loop = asyncio.get_running_loop()
    log: list[tuple[str, int, float]] = []
    line = DelayLine(loop, delay_s=10.0, loss=0.0, seed=0)
    for seq in range(5):
        line.submit(FakePacket(seq, log, loop))
    line.flush()
    assert [(v, s) for v, s, _ in log] == [("accept", s) for s in range(5)]


def test_bad_settings_are_refused() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            DelayLine(loop, delay_s=-0.1, loss=0.0, seed=0)
        with pytest.raises(ValueError):
            DelayLine(loop, delay_s=0.0, loss=1.1, seed=0)
    finally:
        loop.close()
