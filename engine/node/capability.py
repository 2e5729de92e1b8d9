"""What a node can do: its hardware (GPU via NVML, else CPU) and its *measured* decode speed.

The scheduler places layers by measured throughput, never by what a supplier claims, so a node
runs a short benchmark at start (``measure_throughput``) on randomly initialised layers of the
architecture it is about to serve. The hardware report (``gpu_report``) is informational (what
the supplier tray shows, what an operator reads when a node is slow) and must never stop a node
from starting: a missing or broken NVIDIA driver yields a CPU report with a ``note``.

Privacy: nothing here reports the hostname, the user name or file paths; suppliers are other
people, and the coordinator does not need to know who they are to schedule them.

NVML comes from the ``nvidia-ml-py`` package (module ``pynvml``), imported at call time so that
a machine without it, or a test injecting a fake module, works the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

import engine
from engine.errors import CapacityError, ConfigError
from engine.fragments import torch_thread
from engine.models.config import ModelConfig
from engine.models.llama import FragmentModel, RotaryTable

log = logging.getLogger(__name__)

T = TypeVar("T")

NO_GPU_NOTE = "No NVIDIA GPU found - sharing CPU for testing"

#: Prompt length of the timed prefill: long enough to exercise the matmul path, short enough to be quick.
PREFILL_TOKENS = 64
#: Weights the benchmark may allocate at most (further bounded by free memory, see ``_weight_cap``).
MAX_BENCH_WEIGHT_BYTES = 2 * 1024**3
#: Warm-up plus timing take at most this many times ``seconds`` (to within one forward pass).
#: Building the layers is outside it: that is bounded by the weight cap instead, and the first
#: build in a process also pays torch's one-time import of its meta-device kernels (~1.5 s on a
#: small CPU), which model loading would pay anyway and which says nothing about the node's speed.
TIME_CAP_FACTOR = 3.0


# --------------------------------------------------------------------------------------------
# Hardware report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuDevice:
    """One NVIDIA device as NVML sees it; a field is None where the device does not support the query."""

    index: int
    name: str
    vram_total_bytes: int | None
    vram_free_bytes: int | None
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None


@dataclass(frozen=True)
class GpuReport:
    """The node's compute hardware.

    ``kind`` is ``"nvidia"`` when NVML found at least one GPU, else ``"cpu"``. The GPU fields
    describe device 0 (what a one-GPU supplier has; NVML's order, which can differ from CUDA's
    when ``CUDA_VISIBLE_DEVICES`` is set) and ``devices`` lists them all. The CPU fields are
    filled in either case: a GPU node still has host memory and cores the scheduler may use.
    """

    kind: str
    #: GPU 0's name, or the CPU model name on a CPU report.
    name: str
    vram_total_bytes: int | None = None
    vram_free_bytes: int | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    driver_version: str | None = None
    devices: tuple[GpuDevice, ...] = ()
    cpu_name: str = ""
    cpu_cores: int | None = None
    ram_total_bytes: int | None = None
    ram_available_bytes: int | None = None
    #: why this is a CPU report (no GPU, or the NVML error), None on a healthy GPU report.
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (``devices`` becomes a list of dicts)."""
        d = asdict(self)
        d["devices"] = [asdict(dev) for dev in self.devices]
        return d


def _text(value: str | bytes) -> str:
    """NVML strings are ``bytes`` in older nvidia-ml-py releases and ``str`` in newer ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes ({} where there is none, e.g. macOS and Windows)."""
    out: dict[str, int] = {}
    try:
        lines = Path("/proc/meminfo").read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _cpu_name() -> str:
    """The CPU model (x86 ``model name``; ARM boards spell it differently), else ``platform.processor()``."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            k, sep, value = line.partition(":")
            if sep and k.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _meminfo().get("MemTotal")


def cpu_report(note: str | None = NO_GPU_NOTE) -> GpuReport:
    """The CPU-only report: model name, logical cores, total and available RAM."""
    name = _cpu_name()
    return GpuReport(
        kind="cpu",
        name=name,
        cpu_name=name,
        cpu_cores=os.cpu_count(),
        ram_total_bytes=_ram_total(),
        ram_available_bytes=_meminfo().get("MemAvailable"),
        note=note,
    )


def _optional(nvml: Any, query: Callable[[], T]) -> T | None:
    """Run one NVML query; None where the device does not support it (e.g. power on many laptops)."""
    try:
        return query()
    except nvml.NVMLError_NotSupported:
        return None


def _device(nvml: Any, index: int) -> GpuDevice:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = _optional(nvml, lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    util = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    temp = _optional(nvml, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    milliwatts = _optional(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    return GpuDevice(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        vram_total_bytes=None if mem is None else int(mem.total),
        vram_free_bytes=None if mem is None else int(mem.free),
        utilization_pct=None if util is None else float(util.gpu),
        temperature_c=None if temp is None else float(temp),
        power_w=None if milliwatts is None else milliwatts / 1000.0,
    )


def _is_no_gpu(nvml: Any, exc: Exception) -> bool:
    """Errors that simply mean "this machine has no usable NVIDIA GPU" (not worth an error note)."""
    kinds = tuple(
        getattr(nvml, n) for n in ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded") if hasattr(nvml, n)
    )
    return isinstance(exc, kinds)


def gpu_report() -> GpuReport:
    """Query NVML for every GPU; a CPU report (never an exception) where that is impossible.

    No library or no driver gives ``note=NO_GPU_NOTE``; any other NVML failure gives a CPU report
    whose note carries the error, so a supplier with a broken driver still learns why.
    """
    try:
        import pynvml as nvml
    except ImportError:
        log.info("nvidia-ml-py is not installed; reporting the CPU")
        return cpu_report()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        if _is_no_gpu(nvml, exc):
            log.info("NVML unavailable (%s); reporting the CPU", exc)
            return cpu_report()
        log.warning("NVML failed to initialise: %s", exc)
        return cpu_report(f"NVML error: {exc} - sharing CPU for testing")
    try:
        count = nvml.nvmlDeviceGetCount()
        devices = tuple(_device(nvml, i) for i in range(count))
        driver = _optional(nvml, nvml.nvmlSystemGetDriverVersion)
    except nvml.NVMLError as exc:
        log.warning("NVML query failed: %s", exc)
        return cpu_report(f"NVML error: {exc} - sharing CPU for testing")
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    if not devices:
        return cpu_report()
    host = cpu_report(None)
    first = devices[0]
    return GpuReport(
        kind="nvidia",
        name=first.name,
        vram_total_bytes=first.vram_total_bytes,
        vram_free_bytes=first.vram_free_bytes,
        utilization_pct=first.utilization_pct,
        temperature_c=first.temperature_c,
        power_w=first.power_w,
        driver_version=None if driver is None else _text(driver),
        devices=devices,
        cpu_name=host.cpu_name,
        cpu_cores=host.cpu_cores,
        ram_total_bytes=host.ram_total_bytes,
        ram_available_bytes=host.ram_available_bytes,
    )


# --------------------------------------------------------------------------------------------
# Periodic telemetry
# --------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    """Resident memory of this process now (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text(encoding="ascii").split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _cpu_telemetry() -> dict[str, Any]:
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows has no load average
        load = None
    return {"kind": "cpu", "load_avg": load, "rss_bytes": _rss_bytes()}


class _Telemetry:
    """Keeps NVML initialised between calls: init/shutdown per sample would cost more than the sample.

    The first failure to initialise is remembered, so a CPU node pays for the attempt only once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._handle: Any = None
        self._tried = False

    def _open(self) -> None:
        self._tried = True
        try:
            import pynvml as nvml
        except ImportError:
            return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            log.debug("GPU telemetry unavailable: %s", exc)
            return
        try:
            if nvml.nvmlDeviceGetCount() >= 1:
                self._handle = nvml.nvmlDeviceGetHandleByIndex(0)
                self._nvml = nvml
                return
        except nvml.NVMLError as exc:
            log.debug("GPU telemetry unavailable: %s", exc)
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()

    def sample(self) -> dict[str, Any]:
        with self._lock:
            if not self._tried:
                self._open()
            nvml, handle = self._nvml, self._handle
            if nvml is None:
                return _cpu_telemetry()
            try:
                mem = _optional(nvml, lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
                util = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
                temp = _optional(nvml, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
                milliwatts = _optional(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            except nvml.NVMLError as exc:  # e.g. the GPU fell off the bus: report the CPU from now on
                log.warning("GPU telemetry failed, reporting the CPU from now on: %s", exc)
                self.close()
                return {**_cpu_telemetry(), "note": f"NVML error: {exc}"}
            return {
                "kind": "nvidia",
                "utilization_pct": None if util is None else float(util.gpu),
                "vram_used_bytes": None if mem is None else int(mem.used),
                "vram_total_bytes": None if mem is None else int(mem.total),
                "temperature_c": None if temp is None else float(temp),
                "power_w": None if milliwatts is None else milliwatts / 1000.0,
                "rss_bytes": _rss_bytes(),
            }

    def close(self) -> None:
        """Shut NVML down (callers hold the lock or own the object); later samples are CPU samples."""
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
        self._nvml, self._handle = None, None


_telemetry = _Telemetry()


def gpu_telemetry() -> dict[str, Any]:
    """A cheap sample for periodic reports: GPU 0's utilisation, VRAM used, temperature and power.

    On a CPU node: the 1/5/15-minute load average and this process's resident memory. Never raises.
    """
    return _telemetry.sample()


# --------------------------------------------------------------------------------------------
# Measured throughput
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputReport:
    """Measured batch-1 speed of this node for one architecture (what the scheduler trusts).

    Rates are per decoder layer so that they do not depend on how many layers were benchmarked:
    a fragment of ``n`` layers decodes about ``layers_per_s / n`` tokens per second (plus network).
    """

    #: layer-forwards per second for one decode token with a KV cache (steps * layers / elapsed).
    layers_per_s: float
    #: prompt tokens per second through ONE layer during a prefill of ``prefill_tokens`` tokens.
    prefill_tokens_per_s: float
    #: 1000 / layers_per_s.
    ms_per_layer: float
    #: decode compute rate implied by ``layers_per_s`` and the config's FLOPs per token and layer.
    decode_gflops: float
    device: str
    dtype: str
    threads: int
    layers: int
    decode_steps: int
    prefill_tokens: int
    #: seconds spent in the timed decode steps.
    decode_s: float
    #: seconds spent building the random layers (outside the time cap, see ``TIME_CAP_FACTOR``).
    build_s: float
    #: wall time of the whole benchmark, build and warm-up included.
    total_s: float
    #: True when the hard time cap cut the decode loop short (fewer steps than asked for).
    capped: bool = False
    weight_bytes: int = 0
    #: the node's ``--throttle`` test knob (1.0: full speed); the figures above already include it
    throttle: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Weight bytes of one decoder layer (fused qkv, o, gate/up, down, two norms, biases)."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, cfg.kv_dim
    params = h * (q + 2 * kv) + q * h + 2 * h * i + i * h + 2 * h
    params += (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_bias + (2 * i + h) * cfg.mlp_bias
    return params * torch.empty((), dtype=dtype).element_size()


def _sync(device: torch.device) -> None:
    """Wait for queued kernels, so the clock measures work done rather than work enqueued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _weight_cap(device: torch.device) -> int:
    """At most ``MAX_BENCH_WEIGHT_BYTES`` and a quarter of the memory free on the device."""
    free: int | None = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        free = _meminfo().get("MemAvailable")
    return MAX_BENCH_WEIGHT_BYTES if free is None else min(MAX_BENCH_WEIGHT_BYTES, free // 4)


def _random_layers(cfg: ModelConfig, layers: int, device: torch.device, dtype: torch.dtype) -> FragmentModel:
    """``layers`` decoder layers with N(0, 0.02) weights, built straight on the device in ``dtype``.

    Small weights keep the residual stream in a normal range over many steps (no inf/NaN, which
    would take slow paths on some hardware and make the figure meaningless). Built on the meta
    device first, as the loader does, so no full-size fp32 copy is ever made.
    """
    with torch.device("meta"):
        model = FragmentModel(cfg, 0, layers, embed=False, head=False)
    model = model.to(dtype).to_empty(device=device)
    model.rotary = RotaryTable(cfg)  # real values: it was built on the meta device above
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.zero_()
    return model.eval()


def throttle_pause(elapsed_s: float, throttle: float) -> None:
    """Sleep so that work which took ``elapsed_s`` takes ``throttle`` times as long in all.

    The ``--throttle`` test/demo knob: a node really is that much slower, in its benchmark and in
    serving alike, so tests can run nodes of different speeds on one machine. Sleeping on the
    torch thread holds back every later step of the node, exactly as slower hardware would.
    """
    if throttle > 1.0 and elapsed_s > 0:
        time.sleep((throttle - 1.0) * elapsed_s)


def _measure(
    cfg: ModelConfig,
    device: str,
    dtype: torch.dtype,
    layers: int,
    tokens: int,
    seconds: float,
    throttle: float = 1.0,
) -> ThroughputReport:
    """The benchmark proper; runs on the torch thread (see ``engine.fragments.torch_thread``)."""
    t_start = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    per_layer = _layer_bytes(cfg, dtype)
    cap = _weight_cap(dev)
    if per_layer > cap:
        raise CapacityError(
            f"one decoder layer needs {per_layer / 2**30:.2f} GiB, above the benchmark's "
            f"{cap / 2**30:.2f} GiB cap on {dev}"
        )
    if layers * per_layer > cap:
        log.info("benchmarking %d layers instead of %d to stay under %d MiB", cap // per_layer, layers, cap >> 20)
        layers = cap // per_layer
    prefill = min(PREFILL_TOKENS, cfg.max_position_embeddings - tokens)
    if prefill < 1:
        raise ConfigError(f"tokens={tokens} leaves no room for a prefill in {cfg.max_position_embeddings} positions")

    model = _random_layers(cfg, layers, dev, dtype)
    t_built = time.perf_counter()
    deadline = t_built + TIME_CAP_FACTOR * seconds
    gen = torch.Generator(device=dev).manual_seed(1)
    prompt = torch.randn((1, prefill, cfg.hidden_size), generator=gen, device=dev, dtype=dtype)
    step_in = torch.randn((1, 1, cfg.hidden_size), generator=gen, device=dev, dtype=dtype)
    cache = model.new_cache(prefill + tokens)

    # Warm-up: first calls allocate the cache and pick kernels (oneDNN, cuBLAS) and are slow.
    model(prompt, 0, cache)
    for _ in range(min(3, tokens)):
        model(step_in, cache.length, cache)
    _sync(dev)

    cache.truncate(0)
    t0 = time.perf_counter()
    model(prompt, 0, cache)
    _sync(dev)
    throttle_pause(time.perf_counter() - t0, throttle)
    prefill_s = time.perf_counter() - t0

    # Decode: context stays within [prefill, prefill + tokens) by rolling the cache back, so the
    # figure reflects a typical short context and memory stays bounded however long it runs.
    steps = 0
    capped = False
    t0 = time.perf_counter()
    now = t0
    while steps == 0 or now - t0 < seconds:
        if steps and now >= deadline:
            capped = True
            break
        if cache.length >= prefill + tokens:
            cache.truncate(prefill)
        t_step = time.perf_counter()
        model(step_in, cache.length, cache)
        _sync(dev)
        throttle_pause(time.perf_counter() - t_step, throttle)
        steps += 1
        now = time.perf_counter()
    decode_s = now - t0

    del model, cache
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    layers_per_s = steps * layers / decode_s
    report = ThroughputReport(
        layers_per_s=layers_per_s,
        prefill_tokens_per_s=prefill * layers / prefill_s,
        ms_per_layer=1000.0 / layers_per_s,
        decode_gflops=layers_per_s * cfg.flops_per_token_layer() / 1e9,
        device=str(dev),
        dtype=_dtype_name(dtype),
        threads=torch.get_num_threads(),
        layers=layers,
        decode_steps=steps,
        prefill_tokens=prefill,
        decode_s=decode_s,
        build_s=t_built - t_start,
        total_s=time.perf_counter() - t_start,
        capped=capped,
        weight_bytes=layers * per_layer,
        throttle=throttle,
    )
    if not all(math.isfinite(v) and v > 0 for v in (report.layers_per_s, report.prefill_tokens_per_s)):
        raise RuntimeError(f"benchmark produced a non-finite rate: {report}")  # a bug, not a user error
    log.info(
        "throughput on %s/%s: %.0f layers/s (%.3f ms/layer), prefill %.0f tok/s per layer, %d threads",
        report.device,
        report.dtype,
        report.layers_per_s,
        report.ms_per_layer,
        report.prefill_tokens_per_s,
        report.threads,
    )
    return report


def _check_args(layers: int, tokens: int, seconds: float, throttle: float = 1.0) -> None:
    if layers < 1 or tokens < 1 or not 0 < seconds < float("inf"):
        raise ConfigError(f"benchmark needs layers >= 1, tokens >= 1, seconds > 0 (got {layers}, {tokens}, {seconds})")
    if not 1.0 <= throttle <= 1000.0:
        raise ConfigError(f"throttle must be between 1 and 1000, got {throttle}")


def _on_torch_thread() -> bool:
    # ThreadPoolExecutor names its threads "<prefix>_<n>"; submitting to the one-worker pool from
    # its own thread would wait forever, so such callers run the benchmark inline instead.
    return threading.current_thread().name.startswith("torch_")


def measure_throughput(
    cfg: ModelConfig,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
    tokens: int = 16,
    seconds: float = 1.0,
    throttle: float = 1.0,
) -> ThroughputReport:
    """Benchmark ``layers`` random layers of ``cfg``'s architecture for about ``seconds``.

    Batch-1 single-token decode steps with a KV cache (the pipeline's steady state) plus one
    prefill of ``PREFILL_TOKENS``. ``tokens`` is the decode window: after that many steps the
    cache is rolled back to the prompt. Warm-up and timing are capped at ``TIME_CAP_FACTOR *
    seconds`` (checked between forward passes; the warm-up, one prefill and one decode step
    always run) and weights at ``MAX_BENCH_WEIGHT_BYTES`` (fewer layers are used if needed;
    ``CapacityError`` if one layer does not fit), which also bounds the build time.

    All torch work runs on the process's torch thread: a benchmark on another thread would both
    mis-measure and slow later compute (two OpenMP teams competing for cores). Blocking: from
    async code use ``measure_throughput_async``.
    """
    _check_args(layers, tokens, seconds, throttle)
    if _on_torch_thread():
        return _measure(cfg, device, dtype, layers, tokens, seconds, throttle)
    return torch_thread.call(_measure, cfg, device, dtype, layers, tokens, seconds, throttle)


async def measure_throughput_async(
    cfg: ModelConfig,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
    tokens: int = 16,
    seconds: float = 1.0,
    throttle: float = 1.0,
) -> ThroughputReport:
    """``measure_throughput`` awaited on the torch thread, leaving the event loop free meanwhile."""
    _check_args(layers, tokens, seconds, throttle)
    return await torch_thread.run(_measure, cfg, device, dtype, layers, tokens, seconds, throttle)


# --------------------------------------------------------------------------------------------
# Memory offered to the grid
# --------------------------------------------------------------------------------------------

#: Share of the free VRAM a GPU node offers by default (the rest absorbs fragmentation and the
#: CUDA context) ...
VRAM_SHARE = 0.9
#: ... and of the available RAM a CPU node offers (its owner still uses the machine).
RAM_SHARE = 0.5


def default_memory_bytes(device: str) -> int:
    """Memory (weights plus KV caches) a node offers the grid when ``--memory-mb`` is not given.

    90% of the free VRAM on a CUDA device, else half of the available RAM; 0 when neither can be
    read (the node is then given no layers rather than more than it can hold). Queries CUDA, so
    call it on the torch thread for a CUDA device.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return int(torch.cuda.mem_get_info(dev)[0] * VRAM_SHARE)
    available = _meminfo().get("MemAvailable")
    return 0 if available is None else int(available * RAM_SHARE)


# --------------------------------------------------------------------------------------------
# Combined report
# --------------------------------------------------------------------------------------------


def _platform_info() -> dict[str, Any]:
    # Deliberately not platform.uname()/platform.node(): they carry the hostname.
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def _combine(gpu: GpuReport, throughput: ThroughputReport | None) -> dict[str, Any]:
    return {
        "kluster_version": engine.__version__,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "platform": _platform_info(),
        "gpu": gpu.to_dict(),
        "throughput": None if throughput is None else throughput.to_dict(),
    }


def capability_report(
    cfg: ModelConfig | None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    throughput: ThroughputReport | None = None,
    seconds: float = 1.0,
) -> dict[str, Any]:
    """Everything a node tells the coordinator about itself, as JSON-able data.

    Hardware (``gpu_report``), the measured throughput for ``cfg`` (benchmarked here unless
    ``throughput`` is given; None without a config), platform, torch and Kluster versions. No
    hostname, user name or path: see the module docstring.
    """
    if throughput is None and cfg is not None:
        throughput = measure_throughput(cfg, device=device, dtype=dtype, seconds=seconds)
    return _combine(gpu_report(), throughput)


async def capability_report_async(
    cfg: ModelConfig | None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    throughput: ThroughputReport | None = None,
    seconds: float = 1.0,
    throttle: float = 1.0,
) -> dict[str, Any]:
    """``capability_report`` for async code: NVML (which can take a second to initialise) runs in a
    worker thread and the benchmark on the torch thread."""
    if throughput is None and cfg is not None:
        throughput = await measure_throughput_async(cfg, device=device, dtype=dtype, seconds=seconds, throttle=throttle)
    gpu = await asyncio.to_thread(gpu_report)
    return _combine(gpu, throughput)
