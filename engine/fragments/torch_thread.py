"""One thread per process runs all multi-threaded torch work (compute), off the asyncio loop.

Why one and always the same: each thread that enters an OpenMP parallel region gets its own
OpenMP team, and once a process has more OpenMP threads than cores, libgomp cuts the time idle
workers spin from ``GOMP_SPINCOUNT`` to ~100 iterations, so every one of a decode step's ~150
parallel regions must wake a sleeping worker. Measured on a 2-core box with SmolLM2 decode:
24-27 tok/s when one thread did all torch work, 11-17 tok/s once a second thread had also run
torch ops; 10 layers took 7.1 ms per step on one team and 11.7-13.1 ms once a second team existed.
So warm-up and every step go through ``run``.

Loading a new span while the old one keeps serving (a rebalance) needs a second thread:
``run_loader`` runs it on a loader thread whose torch is single-threaded (so it never starts a
team), after the torch thread has fixed its own thread count.
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
_loader: ThreadPoolExecutor | None = None


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


def _single_threaded_loader() -> None:
    """Loader-thread initializer: torch on this thread runs without an OpenMP team.

    ``torch.set_num_threads`` also sets the count that threads initialising torch later start
    with, so the torch thread initialises first (``get_num_threads`` does that) and keeps its own.
    """
    import torch

    pool().submit(torch.get_num_threads).result()
    torch.set_num_threads(1)


def loader() -> ThreadPoolExecutor:
    """The process's loader thread (created on first use): reading and building weights."""
    global _loader
    with _lock:
        if _loader is None:
            _loader = ThreadPoolExecutor(1, thread_name_prefix="loader", initializer=_single_threaded_loader)
        return _loader


async def run_loader(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await ``fn(*args, **kwargs)`` on the loader thread, beside the torch thread's steps."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(loader(), lambda: fn(*args, **kwargs))
