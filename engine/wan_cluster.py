"""A coordinator, N nodes and a client, each on its own emulated host (``engine.wanemu``).

The WAN chaos tests and ``kluster bench wan`` need the real processes of a grid spread over a
network with delay, loss and partitions. Hosts are ``coord``, ``client`` and ``n1`` .. ``nN``;
node ``node-i`` runs on host ``ni``. The client is a ``kluster generate --json`` process on the
``client`` host, because the root namespace cannot reach the emulated addresses.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.errors import KlusterError
from engine.launcher import LocalCluster, kluster_command
from engine.wanemu import Topology

log = logging.getLogger(__name__)

#: Waits inside the client host for the coordinator to offer a full route (nodes loaded).
_WAIT_FOR_ROUTE = """
import sys, time, urllib.request, urllib.error
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/v1/route?model=" + sys.argv[2], timeout=5).read()
        break
    except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
            sys.exit("no route in time")
        time.sleep(0.3)
"""


def node_host(node_name: str) -> str:
    """The emulated host a node runs on: ``node-2`` -> ``n2``."""
    return "n" + node_name.rsplit("-", 1)[1]


class WanCluster:
    """``with WanCluster(pack, 3, log_dir) as grid: grid.topo.set_link(...); grid.generate(...)``."""

    def __init__(
        self,
        pack_dir: Path,
        nodes: int,
        log_dir: Path,
        *,
        model_id: str = "smollm2-135m",
        seed: int = 0,
        extra_hosts: Sequence[str] = (),
        prepare: Callable[[Topology], Sequence[str]] | None = None,
    ):
        """``extra_hosts`` are further emulated hosts (e.g. a TURN server's); ``prepare(topo)`` runs
        once every host exists and before any process starts (firewall rules, extra servers) and
        returns extra ``kluster coordinator`` arguments (e.g. ``--turn`` with a host's address)."""
        self.model_id = model_id
        self.topo = Topology(["coord", "client", *(f"n{i}" for i in range(1, nodes + 1)), *extra_hosts], seed=seed)
        self._prepare = prepare
        self.cluster = LocalCluster(
            pack_dir, nodes, log_dir=log_dir, cache_dir=log_dir / "cache", wrap=self._wrap, host=""
        )
        self.url = ""
        self.log_dir = log_dir
        self._runs = 0

    def _wrap(self, name: str) -> list[str]:
        host = "coord" if name == "coordinator" else node_host(name)
        return self.topo.host(host).exec_args([])

    def __enter__(self) -> WanCluster:
        self.topo.start()
        try:
            self.cluster.host = self.topo.host("coord").ip
            if self._prepare is not None:
                self.cluster.coordinator_args += list(self._prepare(self.topo))
            self.url = self.cluster.start()
            waited = self.topo.host("client").run(
                [sys.executable, "-c", _WAIT_FOR_ROUTE, self.url, self.model_id, "240"],
                timeout=260,
                capture_output=True,
                text=True,
            )
            if waited.returncode != 0:
                raise KlusterError(f"the emulated grid found no route: {waited.stderr.strip()[-300:]}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.cluster.stop()
        finally:
            self.topo.close()

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        extra: tuple[str, ...] = (),
        timeout_s: float = 300.0,
    ) -> list[dict[str, Any]]:
        """Run ``kluster generate --json`` on the client host; its events, in order.

        ``on_event`` sees each event as it arrives (to inject faults at a given token). Raises
        KlusterError with the client's last error line if it fails or runs past ``timeout_s``.
        """
        cmd = kluster_command(
            "generate", "--coordinator", self.url, "--prompt", prompt, "--chat",
            "--max-new-tokens", str(max_new_tokens), "--json", *extra,
        )  # fmt: skip
        self._runs += 1
        errlog = self.log_dir / f"client-{self._runs}.log"
        with errlog.open("w") as err:  # a file, not a pipe: a chatty client can never block on it
            proc = self.topo.host("client").popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
            killer = threading.Timer(timeout_s, proc.kill)
            killer.start()
            events: list[dict[str, Any]] = []
            try:
                for line in proc.stdout or ():
                    event = json.loads(line)
                    events.append(event)
                    if on_event is not None:
                        on_event(event)
                proc.wait(timeout=30)
            finally:
                killer.cancel()
        if proc.returncode != 0:
            lines = errlog.read_text().strip().splitlines()
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            raise KlusterError(f"the client on the emulated grid failed: {last} (see {errlog})")
        return events
