"""Token buckets: bursts, refill, independent keys, bounded memory, address keys and option parsing."""

from __future__ import annotations

import pytest

from engine.coordinator.ratelimit import Buckets, Limit, client_key, parse_limit, retry_after
from engine.errors import ConfigError


def test_a_burst_passes_then_requests_wait_for_the_refill() -> None:
    buckets = Buckets(Limit(rate=2.0, burst=3.0))
    assert [buckets.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 0.0) == pytest.approx(0.5)  # one token comes back every 1/rate s
    assert buckets.take("a", 0.25) == pytest.approx(0.25)  # a refused request takes nothing
    assert buckets.take("a", 0.5) == 0.0
    assert buckets.take("a", 0.5) == pytest.approx(0.5)
    assert [buckets.take("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # refilled, never above the burst
    assert buckets.take("a", 100.0) > 0


def test_a_request_may_cost_several_tokens_and_never_more_than_a_burst() -> None:
    buckets = Buckets(Limit(rate=100.0, burst=1000.0))  # e.g. positions a spot check recomputes
    assert buckets.take("a", 0.0, 600) == 0.0
    assert buckets.take("a", 0.0, 600) == pytest.approx(2.0)  # 200 missing at 100/s; nothing taken
    assert buckets.take("a", 2.0, 600) == 0.0
    assert buckets.take("b", 0.0, 5000) == 0.0  # one request over the burst passes a full bucket ...
    assert buckets.take("b", 0.0, 1) > 0  # ... and empties it


def test_keys_have_their_own_buckets() -> None:
    buckets = Buckets(Limit(rate=1.0, burst=1.0))
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0


def test_a_sustained_flood_gets_exactly_the_rate() -> None:
    buckets = Buckets(Limit(rate=10.0, burst=5.0))
    allowed = sum(buckets.take("a", i / 1000) == 0.0 for i in range(10_000))  # 1000 requests/s for 10 s
    assert allowed == pytest.approx(5 + 10 * 10, abs=2)


def test_full_buckets_are_forgotten_so_memory_stays_bounded() -> None:
    buckets = Buckets(Limit(rate=1.0, burst=2.0), max_keys=1000)
    for i in range(500):
        buckets.take(f"ip-{i}", 0.0)
    assert len(buckets) == 500
    buckets.take("late", 10.0)  # every other bucket refilled long ago: the same as no bucket
    assert len(buckets) == 1
    for i in range(5000):  # more addresses than max_keys at once
        buckets.take(f"flood-{i}", 20.0)
    assert len(buckets) == 1000


def test_forgetting_a_bucket_early_only_ever_lets_its_owner_through_sooner() -> None:
    buckets = Buckets(Limit(rate=0.001, burst=1.0), max_keys=2)
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) > 0
    buckets.take("b", 0.0)
    buckets.take("c", 0.0)  # "a" (least recently used) is dropped
    assert buckets.take("a", 0.0) == 0.0


def test_client_keys_group_ipv6_by_64() -> None:
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:198.51.100.4") == "198.51.100.4"
    assert client_key(None) == "unknown"
    assert client_key("/run/kluster.sock") == "/run/kluster.sock"


def test_limits_parse_from_options() -> None:
    assert parse_limit("50:500") == Limit(50.0, 500.0)
    assert parse_limit("0.5:3") == Limit(0.5, 3.0)
    assert parse_limit("20") == Limit(20.0, 200.0)
    assert parse_limit("off") is None and parse_limit("OFF") is None
    for bad in ("fast", "10:x", "0:10", "-1:5", "5:0.5"):
        with pytest.raises(ConfigError):
            parse_limit(bad)


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert [retry_after(w) for w in (0.01, 1.0, 1.2, 59.9)] == ["1", "1", "2", "60"]
