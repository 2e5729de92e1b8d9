"""The loader thread never starts a second OpenMP team (which would slow every decode step)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Runs in a fresh interpreter: the test process's own threads have long since touched torch.
_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os
    import torch
    from engine.fragments import torch_thread

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def big_op():
        x = torch.ones(4_000_000)
        return float((x * 2 + 1).sum()), torch.get_num_threads()

    torch_thread.call(torch.set_num_threads, 2)
    torch_thread.call(big_op)  # the torch thread's team exists now
    torch_thread.loader().submit(int).result()  # the loader thread exists now
    before = tasks()
    _, loader_threads = asyncio.run(torch_thread.run_loader(big_op))
    after_load = tasks()
    _, torch_threads = torch_thread.call(big_op)
    print(json.dumps({"before": before, "after_load": after_load, "loader_threads": loader_threads,
                      "torch_threads": torch_threads, "after_step": tasks()}))
    """
)


def test_loader_runs_torch_single_threaded_and_starts_no_team() -> None:
    import json

    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loader_threads"] == 1
    # the torch thread keeps the count it was given, though the loader set 1 after it
    assert got["torch_threads"] == 2
    # a parallel-sized op on the loader created no OpenMP worker thread
    assert got["after_load"] == got["before"]
    assert got["after_step"] == got["before"]
