"""Node capability reports: NVML GPU report / CPU fallback, telemetry, the measured throughput benchmark.

This box has no NVIDIA GPU, so the NVML *success* paths are checked with a fake ``pynvml``
module injected into ``sys.modules`` (mocked because no GPU exists here); the "no GPU" path uses
the real nvidia-ml-py against the real absence of the NVML library.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import math
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from engine.errors import CapacityError, ConfigError
from engine.fragments import torch_thread
from engine.models.config import parse_config
from engine.node import capability as cap

pynvml = pytest.importorskip("pynvml")

TINY = parse_config(
    dict(
        model_type="llama",
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
# SmolLM2-135M's layer shape (30 layers of hidden 576, 9 query heads over 3 kv heads).
SMOLLM2_LIKE = parse_config(
    dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    )
)


def _real_nvml_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


HAS_NVML = _real_nvml_present()

# ----------------------------------------------------------------------------------------------
# Fake NVML (mocked because no GPU exists here)
# ----------------------------------------------------------------------------------------------


def _fake_nvml(
    *,
    name: str | bytes = b"NVIDIA GeForce RTX 4090",
    init_error: Exception | None = None,
    power_error: Exception | None = None,
    count: int = 1,
) -> types.ModuleType:
    """A stand-in ``pynvml`` with one device; it uses the real package's exception classes."""
    fake = types.ModuleType("pynvml")
    for attr in dir(pynvml):
        if attr.startswith("NVMLError") or attr.startswith("NVML_"):
            setattr(fake, attr, getattr(pynvml, attr))
    fake.calls = []  # type: ignore[attr-defined]

    def record(fn_name: str, result: Callable[..., Any]) -> Callable[..., Any]:
        def fn(*args: Any) -> Any:
            fake.calls.append(fn_name)  # type: ignore[attr-defined]
            return result(*args)

        return fn

    def init() -> None:
        if init_error is not None:
            raise init_error

    def power(_handle: object) -> int:
        if power_error is not None:
            raise power_error
        return 123_456  # milliwatts

    fake.nvmlInit = record("init", init)  # type: ignore[attr-defined]
    fake.nvmlShutdown = record("shutdown", lambda: None)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = record("count", lambda: count)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = record("handle", lambda i: ("handle", i))  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = record("name", lambda h: name)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = record(  # type: ignore[attr-defined]
        "memory", lambda h: types.SimpleNamespace(total=24 * 2**30, free=20 * 2**30, used=4 * 2**30)
    )
    fake.nvmlDeviceGetUtilizationRates = record(  # type: ignore[attr-defined]
        "util", lambda h: types.SimpleNamespace(gpu=37, memory=12)
    )
    fake.nvmlDeviceGetTemperature = record("temp", lambda h, sensor: 61)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetPowerUsage = record("power", power)  # type: ignore[attr-defined]
    fake.nvmlSystemGetDriverVersion = record("driver", lambda: b"550.54.14")  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Callable[[types.ModuleType], types.ModuleType]:
    """Install a fake pynvml for the code under test, with a fresh telemetry state."""

    def install(fake: types.ModuleType) -> types.ModuleType:
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        monkeypatch.setattr(cap, "_telemetry", cap._Telemetry())
        return fake

    return install


# ----------------------------------------------------------------------------------------------
# gpu_report
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_NVML, reason="this machine has a working NVIDIA driver")
def test_gpu_report_without_nvidia_is_a_cpu_report() -> None:
    report = cap.gpu_report()
    assert report.kind == "cpu"
    assert report.note == "No NVIDIA GPU found - sharing CPU for testing"
    assert report.name and report.name == report.cpu_name
    assert report.cpu_cores is not None and report.cpu_cores >= 1
    assert report.ram_total_bytes is not None and report.ram_total_bytes > 2**26
    assert report.devices == () and report.vram_total_bytes is None and report.power_w is None


@pytest.mark.skipif(not HAS_NVML, reason="needs an NVIDIA driver")
def test_gpu_report_with_real_gpu() -> None:
    report = cap.gpu_report()
    assert report.kind == "nvidia" and report.note is None
    assert report.name and report.vram_total_bytes and report.devices


@pytest.mark.parametrize("name", [b"NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"])
def test_gpu_report_carries_nvml_values(inject: Callable[..., types.ModuleType], name: str | bytes) -> None:
    fake = inject(_fake_nvml(name=name))
    report = cap.gpu_report()
    assert report.kind == "nvidia"
    assert report.note is None
    assert report.name == "NVIDIA GeForce RTX 4090"
    assert report.vram_total_bytes == 24 * 2**30
    assert report.vram_free_bytes == 20 * 2**30
    assert report.utilization_pct == 37.0
    assert report.temperature_c == 61.0
    assert report.power_w == pytest.approx(123.456)
    assert report.driver_version == "550.54.14"
    assert len(report.devices) == 1 and report.devices[0].name == report.name
    assert report.cpu_cores is not None  # host facts ride along on a GPU report
    assert fake.calls[0] == "init" and fake.calls[-1] == "shutdown"
    json.dumps(report.to_dict())


def test_gpu_report_lists_every_device(inject: Callable[..., types.ModuleType]) -> None:
    inject(_fake_nvml(count=3))
    report = cap.gpu_report()
    assert [d.index for d in report.devices] == [0, 1, 2]
    assert [d["index"] for d in report.to_dict()["devices"]] == [0, 1, 2]


def test_unsupported_power_query_gives_none(inject: Callable[..., types.ModuleType]) -> None:
    inject(_fake_nvml(power_error=pynvml.NVMLError_NotSupported()))
    report = cap.gpu_report()
    assert report.kind == "nvidia"
    assert report.power_w is None
    assert report.temperature_c == 61.0 and report.vram_total_bytes == 24 * 2**30


def test_generic_nvml_error_at_init_gives_cpu_report_with_the_error(inject: Callable[..., types.ModuleType]) -> None:
    inject(_fake_nvml(init_error=pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)))
    report = cap.gpu_report()
    assert report.kind == "cpu"
    assert report.note is not None and "Unknown Error" in report.note


def test_nvml_error_mid_query_gives_cpu_report_and_still_shuts_down(inject: Callable[..., types.ModuleType]) -> None:
    fake = inject(_fake_nvml(power_error=pynvml.NVMLError_GpuIsLost()))
    report = cap.gpu_report()
    assert report.kind == "cpu"
    assert report.note is not None and "GPU is lost" in report.note
    assert fake.calls[-1] == "shutdown"


def test_nvml_without_devices_gives_cpu_report(inject: Callable[..., types.ModuleType]) -> None:
    fake = inject(_fake_nvml(count=0))
    report = cap.gpu_report()
    assert report.kind == "cpu" and report.note == cap.NO_GPU_NOTE
    sample = cap.gpu_telemetry()
    assert sample["kind"] == "cpu"
    assert fake.calls.count("init") == fake.calls.count("shutdown") == 2


def test_driver_not_loaded_counts_as_no_gpu(inject: Callable[..., types.ModuleType]) -> None:
    inject(_fake_nvml(init_error=pynvml.NVMLError_DriverNotLoaded()))
    assert cap.gpu_report().note == cap.NO_GPU_NOTE


def test_missing_nvml_package_gives_cpu_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    report = cap.gpu_report()
    assert report.kind == "cpu" and report.note == cap.NO_GPU_NOTE


# ----------------------------------------------------------------------------------------------
# gpu_telemetry
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_NVML, reason="this machine has a working NVIDIA driver")
def test_cpu_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cap, "_telemetry", cap._Telemetry())
    sample = cap.gpu_telemetry()
    assert sample["kind"] == "cpu"
    assert sample["rss_bytes"] > 0
    assert len(sample["load_avg"]) == 3
    json.dumps(sample)


def test_gpu_telemetry_initialises_nvml_once(inject: Callable[..., types.ModuleType]) -> None:
    fake = inject(_fake_nvml())
    first, second = cap.gpu_telemetry(), cap.gpu_telemetry()
    assert first == {**second, "rss_bytes": first["rss_bytes"]}
    assert first["kind"] == "nvidia"
    assert first["utilization_pct"] == 37.0
    assert first["vram_used_bytes"] == 4 * 2**30
    assert first["temperature_c"] == 61.0
    assert first["power_w"] == pytest.approx(123.456)
    assert fake.calls.count("init") == 1 and "shutdown" not in fake.calls


def test_gpu_telemetry_falls_back_to_cpu_when_the_gpu_fails(inject: Callable[..., types.ModuleType]) -> None:
    inject(_fake_nvml(power_error=pynvml.NVMLError_GpuIsLost()))
    sample = cap.gpu_telemetry()
    assert sample["kind"] == "cpu" and "GPU is lost" in sample["note"]
    assert cap.gpu_telemetry()["kind"] == "cpu"


# ----------------------------------------------------------------------------------------------
# measure_throughput (real measurements on this CPU)
# ----------------------------------------------------------------------------------------------


def _check_rates(report: cap.ThroughputReport) -> None:
    for value in (report.layers_per_s, report.prefill_tokens_per_s, report.ms_per_layer, report.decode_gflops):
        assert math.isfinite(value) and value > 0
    assert report.ms_per_layer == pytest.approx(1000.0 / report.layers_per_s)
    assert report.layers_per_s == pytest.approx(report.decode_steps * report.layers / report.decode_s)
    assert report.device == "cpu" and report.dtype == "float32" and report.threads >= 1


def test_measure_throughput_tiny_is_positive_and_within_its_cap() -> None:
    seconds = 0.5
    t0 = time.perf_counter()
    report = cap.measure_throughput(TINY, seconds=seconds)
    wall = time.perf_counter() - t0
    _check_rates(report)
    assert report.layers == 2 and report.prefill_tokens == cap.PREFILL_TOKENS
    assert report.decode_steps >= 1 and report.decode_s >= seconds * 0.9
    # Building is outside the cap (bounded by the weight cap); the cap holds to within one step.
    assert report.total_s - report.build_s < cap.TIME_CAP_FACTOR * seconds + 0.2
    assert wall < report.build_s + cap.TIME_CAP_FACTOR * seconds + 0.5
    json.dumps(report.to_dict())


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the duration of a test (restored afterwards).

    On a small shared box, OpenMP barriers wait whenever a sibling thread is descheduled, which
    swamps the tiny model's microsecond-sized ops and makes sizes compare by scheduler luck.
    """
    before = torch_thread.call(torch.get_num_threads)
    torch_thread.call(torch.set_num_threads, 1)
    yield
    torch_thread.call(torch.set_num_threads, before)


def test_bigger_layers_measure_slower(one_torch_thread: None) -> None:
    # Best of two, interleaved, so a burst of load on the machine hits both sizes alike.
    tiny, big = [], []
    for _ in range(2):
        tiny.append(cap.measure_throughput(TINY, seconds=0.3))
        big.append(cap.measure_throughput(SMOLLM2_LIKE, seconds=0.3))
    for r in tiny + big:
        _check_rates(r)
    best_tiny, best_big = max(r.layers_per_s for r in tiny), max(r.layers_per_s for r in big)
    assert best_tiny > 2 * best_big, (best_tiny, best_big)
    assert big[0].weight_bytes > 50 * tiny[0].weight_bytes


def test_time_cap_stops_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cap, "TIME_CAP_FACTOR", 0.0)  # the deadline has passed before decode starts
    report = cap.measure_throughput(TINY, seconds=5.0)
    assert report.capped and report.decode_steps == 1
    assert report.total_s < 5.0
    _check_rates(report)


def test_memory_cap_reduces_layers_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    one_layer = cap._layer_bytes(TINY, torch.float32)
    monkeypatch.setattr(cap, "MAX_BENCH_WEIGHT_BYTES", one_layer + one_layer // 2)
    report = cap.measure_throughput(TINY, layers=4, seconds=0.1)
    assert report.layers == 1 and report.weight_bytes == one_layer
    monkeypatch.setattr(cap, "MAX_BENCH_WEIGHT_BYTES", one_layer - 1)
    with pytest.raises(CapacityError, match="one decoder layer"):
        cap.measure_throughput(TINY, seconds=0.1)


def test_layer_bytes_match_the_model() -> None:
    from engine.models.llama import FragmentModel

    for cfg in (TINY, SMOLLM2_LIKE):
        with torch.device("meta"):
            model = FragmentModel(cfg, 0, 1, embed=False, head=False)
        assert cap._layer_bytes(cfg, torch.float32) == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("kwargs", [dict(layers=0), dict(tokens=0), dict(seconds=0.0), dict(seconds=math.inf)])
def test_bad_benchmark_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        cap.measure_throughput(TINY, **kwargs)


def test_runs_on_the_torch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = cap._measure

    def spy(*args: Any) -> cap.ThroughputReport:
        import threading

        seen.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(cap, "_measure", spy)
    cap.measure_throughput(TINY, seconds=0.05)
    # Called from the torch thread itself it runs inline instead of deadlocking on its own pool.
    torch_thread.call(cap.measure_throughput, TINY, seconds=0.05)
    torch_thread_name = torch_thread.call(lambda: __import__("threading").current_thread().name)
    assert seen == [torch_thread_name, torch_thread_name]


async def test_measure_throughput_async_keeps_the_loop_free() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        report = await cap.measure_throughput_async(TINY, seconds=0.3)
    finally:
        task.cancel()
    _check_rates(report)
    assert ticks >= 5


# ----------------------------------------------------------------------------------------------
# capability_report
# ----------------------------------------------------------------------------------------------


def _assert_private(text: str) -> None:
    for secret in (socket.gethostname(), getpass.getuser()):
        if len(secret) >= 4:  # a 1-3 character name could occur by chance in any JSON
            assert secret not in text


def test_capability_report_is_json_and_private() -> None:
    report = cap.capability_report(TINY, seconds=0.1)
    text = json.dumps(report)
    assert json.loads(text) == report
    _assert_private(text)
    assert report["throughput"]["layers_per_s"] > 0
    assert report["gpu"]["kind"] in ("cpu", "nvidia")
    assert report["kluster_version"] and report["torch_version"] == torch.__version__
    assert set(report["platform"]) >= {"system", "machine", "python"}


def test_capability_report_without_config_or_with_given_throughput() -> None:
    assert cap.capability_report(None)["throughput"] is None
    given = cap.measure_throughput(TINY, seconds=0.05)
    assert cap.capability_report(TINY, throughput=given)["throughput"] == given.to_dict()


async def test_capability_report_async(inject: Callable[..., types.ModuleType]) -> None:
    inject(_fake_nvml())
    report = await cap.capability_report_async(TINY, seconds=0.05)
    text = json.dumps(report)
    _assert_private(text)
    assert report["gpu"]["kind"] == "nvidia" and report["gpu"]["power_w"] == pytest.approx(123.456)
    assert report["throughput"]["layers"] == 2
