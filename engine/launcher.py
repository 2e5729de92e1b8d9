"""Start a coordinator and N nodes on this machine as separate processes (demo, bench, tests).

Children are real ``kluster coordinator`` / ``kluster node`` processes talking over loopback,
exactly as on separate machines. On Linux each child is asked to die with its parent
(PR_SET_PDEATHSIG), so even a SIGKILLed demo leaves no process behind; ``stop`` terminates them,
escalating to SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import aiohttp

from engine.errors import CoordinatorError, KlusterError, NoRouteError
from engine.transport.signaling import get_json

log = logging.getLogger(__name__)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def kluster_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


def share_memory_mb(pack_dir: Path, nodes: int) -> int:
    """Memory (MiB) for each of ``nodes`` nodes to hold an even share of the pack's fragments.

    A local cluster stands for machines that each hold a part of the model: with this much memory
    placement gives every node about units/nodes fragments, so routes really are pipelines (on one
    machine with plenty of RAM every node could otherwise hold the whole model).
    """
    from engine.fragments.store import read_pack
    from engine.models.config import load_config
    from engine.scheduler.placement import memory_for_units, pack_layout

    pack = read_pack(pack_dir)
    layout = pack_layout(pack.model_id, pack.manifests, load_config(pack.fragment_dir(0)))
    return math.ceil(memory_for_units(layout, math.ceil(layout.units / max(1, nodes))) / 2**20)


class LocalCluster:
    """A coordinator plus ``nodes`` node processes serving the pack in ``pack_dir``."""

    def __init__(
        self,
        pack_dir: Path,
        nodes: int = 3,
        *,
        cache_dir: Path | None = None,
        log_dir: Path | None = None,
        node_threads: int | None = None,
        host: str = "127.0.0.1",
        benchmark_s: float = 0.5,
        wrap: Callable[[str], list[str]] | None = None,
        memory_mb: int | None = None,
        node_args: Mapping[str, Sequence[str]] | None = None,
        coordinator_args: Sequence[str] = (),
    ) -> None:
        self.pack_dir = pack_dir
        self.nodes = nodes
        self.host = host
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kluster-run-"))
        self.cache_dir = cache_dir or self.log_dir / "cache"
        self.node_threads = node_threads
        self.benchmark_s = benchmark_s
        #: child name ("coordinator", "node-1", ...) -> command prefix, e.g. ``ip netns exec NS``
        #: to run each child in its own network namespace (WAN tests)
        self.wrap = wrap
        #: ``--memory-mb`` of every node; None: an even share of the pack (``share_memory_mb``)
        self.memory_mb = memory_mb
        #: extra ``kluster node`` arguments per node name (later ones win, e.g. another --memory-mb)
        self.node_args = dict(node_args or {})
        #: extra ``kluster coordinator`` arguments
        self.coordinator_args = list(coordinator_args)
        self.url = ""
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.node_procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[object] = []

    def _spawn(self, name: str, args: list[str], stdout: int | None = None) -> subprocess.Popen[bytes]:
        logfile = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(logfile)
        env = dict(os.environ, KLUSTER_LOGLEVEL=os.environ.get("KLUSTER_LOGLEVEL", "INFO"))
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        prefix = self.wrap(name) if self.wrap is not None else []
        return subprocess.Popen(
            [*prefix, *kluster_command(*args)],
            stdout=stdout or logfile,
            stderr=logfile,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=preexec,
        )

    def start_coordinator(self, timeout_s: float = 60.0, port: int = 0) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.coordinator = self._spawn(
            "coordinator",
            [
                "coordinator",
                "--host",
                self.host,
                "--port",
                str(port),
                "--pack",
                str(self.pack_dir),
                "--announce",
                "--db",
                str(self.log_dir / "registry.sqlite3"),
                *self.coordinator_args,
            ],
            stdout=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        stdout = self.coordinator.stdout
        if stdout is None:
            raise CoordinatorError("coordinator has no stdout")
        # The coordinator prints one JSON line once it listens; wait for it, but never forever.
        ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = stdout.readline() if ready else b""
        if not line:
            raise CoordinatorError(f"the coordinator did not start; see {self.log_dir / 'coordinator.log'}")
        self.url = json.loads(line)["coordinator"]
        return self.url

    def start_node(self, name: str) -> subprocess.Popen[bytes]:
        args = [
            "node",
            "--coordinator",
            self.url,
            "--name",
            name,
            "--cache-dir",
            str(self.cache_dir),
            "--benchmark-seconds",
            str(self.benchmark_s),
        ]
        if self.node_threads:
            args += ["--threads", str(self.node_threads)]
        if self.memory_mb is None:
            self.memory_mb = share_memory_mb(self.pack_dir, self.nodes)
        args += ["--memory-mb", str(self.memory_mb), *self.node_args.get(name, ())]
        proc = self._spawn(name, args)
        self.node_procs[name] = proc
        return proc

    def start(self) -> str:
        """Start the coordinator, then the nodes; returns the coordinator URL."""
        self.start_coordinator()
        for i in range(1, self.nodes + 1):
            self.start_node(f"node-{i}")
        return self.url

    async def wait_for_route(self, model_id: str, timeout_s: float = 180.0) -> dict[str, object]:
        """Poll the coordinator until a full route exists (nodes fetched and loaded their fragments)."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while True:
                for name, proc in self.node_procs.items():
                    if proc.poll() is not None:
                        raise KlusterError(f"{name} exited with code {proc.returncode}; see {self.log_dir / name}.log")
                try:
                    return dict(await get_json(http, self.url + "/v1/route", {"model": model_id}))
                except NoRouteError:
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.2)

    def restart_coordinator(self) -> str:
        """kill -9 the coordinator and start a new one on the same port (nodes must find it again)."""
        if self.coordinator is None:
            raise CoordinatorError("no coordinator to restart")
        port = int(self.url.rsplit(":", 1)[1])
        self.coordinator.kill()
        self.coordinator.wait()
        return self.start_coordinator(port=port)

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.node_procs[name]
        proc.send_signal(sig)

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate every child; SIGKILL whatever is still alive after ``grace_s``. Idempotent."""
        procs = [p for p in [*self.node_procs.values(), self.coordinator] if p is not None]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs:
            with contextlib.suppress(Exception):
                f.close()  # type: ignore[attr-defined]
        self._logs.clear()
