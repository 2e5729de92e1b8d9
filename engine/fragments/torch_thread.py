"""One thread per process runs all torch work (loading and compute), off the asyncio loop.

Why one and always the same: each thread that enters an OpenMP parallel region gets its own
OpenMP team, and two teams in one process compete for the cores. Measured on a 2-core box with
SmolLM2 decode: 24-27 tok/s when one thread did all torch work, 11-17 tok/s once a second thread
had also run torch ops. So model loading, warm-up and every step go through ``run``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    """The process's torch thread (created on first use, lives as long as the process)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        return _pool


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await ``fn(*args, **kwargs)`` executed on the torch thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool(), lambda: fn(*args, **kwargs))


def call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Synchronous variant for code outside an event loop (benchmarks, tests)."""
    return pool().submit(fn, *args, **kwargs).result()
