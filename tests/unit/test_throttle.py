"""The ``--throttle`` knob: a node really is N times slower, so its measured speed says so."""

from __future__ import annotations

import time

import pytest

from engine.errors import ConfigError
from engine.models.config import parse_config
from engine.node import capability as cap

SMALL = parse_config(
    {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
)


def test_pause_makes_work_take_throttle_times_as_long() -> None:
    t0 = time.perf_counter()
    cap.throttle_pause(0.05, 3.0)
    assert time.perf_counter() - t0 >= 0.1
    t0 = time.perf_counter()
    cap.throttle_pause(0.05, 1.0)  # full speed: no pause
    assert time.perf_counter() - t0 < 0.05


def test_throttled_benchmark_measures_slower() -> None:
    # Interleaved, so a burst of load on the machine hits both alike; the pause scales with each
    # step's own time, so an 8x throttle measures several times slower whatever the load.
    full, slow = [], []
    for _ in range(2):
        full.append(cap.measure_throughput(SMALL, seconds=0.2))
        slow.append(cap.measure_throughput(SMALL, seconds=0.2, throttle=8.0))
    assert all(r.throttle == 8.0 for r in slow) and all(r.throttle == 1.0 for r in full)
    best_full, best_slow = max(r.layers_per_s for r in full), max(r.layers_per_s for r in slow)
    assert best_full > 3 * best_slow, (best_full, best_slow)


@pytest.mark.parametrize("throttle", [0.5, 0.0, 2000.0])
def test_throttle_out_of_range_is_refused(throttle: float) -> None:
    with pytest.raises(ConfigError, match="throttle"):
        cap.measure_throughput(SMALL, seconds=0.05, throttle=throttle)


def test_default_memory_offer_on_cpu_is_half_the_available_ram() -> None:
    available = cap._meminfo().get("MemAvailable")
    offered = cap.default_memory_bytes("cpu")
    if available is None:
        assert offered == 0
    else:
        assert 0.3 * available < offered < 0.7 * available
