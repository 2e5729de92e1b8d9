"""What the dashboard shows about the card: NVML readings, or a plain CPU fallback.

The app reads NVML itself (``nvidia-ml-py``, module ``pynvml``) rather than asking the node: the
readings are wanted while the node is stopped too, and importing the engine's capability module
would pull torch into the tray process. Without an NVIDIA driver, ``nvmlInit`` raises an
``NVMLError`` and the reading says so in the same words the node reports
(engine.node.capability.NO_GPU_NOTE). Any field a device does not support is None.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NO_GPU_NOTE = "No NVIDIA GPU found - sharing CPU for testing"


@dataclass(frozen=True)
class GpuReading:
    #: True: an NVIDIA GPU through NVML; False: the CPU fallback
    gpu: bool
    name: str
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    #: shown under the name (the fallback's notice, or why a reading failed)
    note: str = ""


def _cpu_reading(note: str = NO_GPU_NOTE) -> GpuReading:
    name = platform.processor() or platform.machine() or "CPU"
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        avail = None
    used = None if total is None or avail is None else total - avail
    return GpuReading(False, f"{name} ({os.cpu_count() or '?'} cores)", used, total, note=note)


class GpuProbe:
    """Reads device ``index`` through NVML; initialises NVML once and remembers that it failed."""

    def __init__(self, index: int = 0, nvml: Any = None) -> None:
        self.index = index
        self._nvml = nvml
        self._handle: Any = None
        self._failed = ""

    def _init(self) -> Any:
        if self._handle is not None or self._failed:
            return self._handle
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self.index)
        except ImportError:
            self._failed = NO_GPU_NOTE
        except Exception as exc:  # NVMLError and its many subclasses: no driver, no device
            log.info("NVML unavailable: %s", exc)
            self._failed = NO_GPU_NOTE
        return self._handle

    def read(self) -> GpuReading:
        handle = self._init()
        if handle is None:
            return _cpu_reading(self._failed or NO_GPU_NOTE)
        nv = self._nvml

        def query(fn: str, *args: Any) -> Any:
            try:
                return getattr(nv, fn)(handle, *args)
            except Exception:  # NVMLError_NotSupported etc.: that field stays empty
                return None

        name = query("nvmlDeviceGetName")
        mem = query("nvmlDeviceGetMemoryInfo")
        util = query("nvmlDeviceGetUtilizationRates")
        temp = query("nvmlDeviceGetTemperature", getattr(nv, "NVML_TEMPERATURE_GPU", 0))
        power = query("nvmlDeviceGetPowerUsage")
        return GpuReading(
            True,
            name.decode() if isinstance(name, bytes) else str(name or "NVIDIA GPU"),
            None if mem is None else int(mem.used),
            None if mem is None else int(mem.total),
            None if util is None else int(util.gpu),
            None if temp is None else int(temp),
            None if power is None else power / 1000.0,
        )

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown: %s", exc)
            self._handle = None


def torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, without importing it (the tray stays light).

    CUDA builds ship ``libtorch_cuda`` next to ``libtorch``; the CPU wheel this project pins does
    not. A node asked for ``cuda`` on a CPU build would only fail and be restarted forever.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return any(lib.glob("libtorch_cuda*")) or any(lib.glob("torch_cuda*.dll"))


def auto_device(reading: GpuReading, cuda_build: bool) -> tuple[str, str]:
    """(device for the node, a note for the dashboard) when the device setting is "auto"."""
    if not reading.gpu:
        return "cpu", ""
    if not cuda_build:
        return "cpu", "this install's torch is CPU-only: the node shares the CPU"
    return "cuda", ""
