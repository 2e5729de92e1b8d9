"""Chaos over an emulated network: a routed node is cut off mid-generation, then comes back.

Five hosts in network namespaces (coordinator, client, three nodes; one fragment each, so the cut
node's span has no replica): at token 5 every packet to and from the middle node is dropped for
10 s or 45 s. The client must notice within 5 s (heartbeats: 1 s, 3 misses), wait for the node,
reconnect through fresh signalling once the partition heals (a 45 s cut outlives every WebRTC
link, and aiortc cannot restart ICE), replay the session, and finish with exactly the tokens of
a run without the fault.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.launcher import LocalCluster, kluster_command
from engine.wanemu import Topology

pytestmark = [pytest.mark.slow, pytest.mark.wan, pytest.mark.timeout(400)]

PROMPT = "Tell me about the history of Rome."
CUT_AT = 5
TOKENS = 40
HOSTS = {"coordinator": "coord", "node-1": "n1", "node-2": "n2", "node-3": "n3"}

_WAIT_FOR_ROUTE = """
import sys, time, urllib.request, urllib.error
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/v1/route?model=smollm2-135m", timeout=5).read()
        break
    except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
            sys.exit("no route in time")
        time.sleep(0.3)
"""


def _generate(topo: Topology, url: str, on_event: Any = None) -> list[dict[str, Any]]:
    """Run ``kluster generate --json`` on the client host; returns its events (bounded in time)."""
    cmd = kluster_command(
        "generate", "--coordinator", url, "--prompt", PROMPT, "--chat",
        "--max-new-tokens", str(TOKENS), "--json", "--route-wait", "120",
    )  # fmt: skip
    proc = topo.host("client").popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(240, proc.kill)
    killer.start()
    events = []
    try:
        if proc.stdout is None:
            raise RuntimeError("no stdout")
        for line in proc.stdout:
            event = json.loads(line)
            events.append(event)
            if on_event is not None:
                on_event(event)
        proc.wait(timeout=30)
    finally:
        killer.cancel()
    stderr = proc.stderr.read() if proc.stderr is not None else ""
    if stderr:
        print(stderr[-4000:])
    assert proc.returncode == 0, stderr[-2000:]
    return events


@pytest.mark.parametrize("cut_s", [10, 45])
def test_partitioned_node_is_detected_resignalled_and_output_identical(
    wan_root: None, smollm2_pack3: Path, tmp_path: Path, cut_s: float
) -> None:
    with Topology(["coord", "client", "n1", "n2", "n3"], seed=3) as topo:
        for host in ("client", "n1", "n2", "n3"):
            topo.set_link(host, delay_ms=5)  # a LAN-like 10 ms round trip; the cut is what matters
        cluster = LocalCluster(
            smollm2_pack3,
            nodes=3,
            host=topo.host("coord").ip,
            log_dir=tmp_path / "logs",
            wrap=lambda name: topo.host(HOSTS[name]).exec_args([]),
        )
        try:
            url = cluster.start()
            waited = topo.host("client").run(
                [sys.executable, "-c", _WAIT_FOR_ROUTE, url, "180"], timeout=200, capture_output=True, text=True
            )
            assert waited.returncode == 0, waited.stderr

            reference = _generate(topo, url)
            route = reference[0]
            assert route["event"] == "route" and len(route["nodes"]) == 3
            victim = HOSTS[route["nodes"][1]["name"]]
            cut: dict[str, float] = {}

            def heal() -> None:
                topo.heal(victim)
                cut["healed"] = time.monotonic()

            def on_event(event: dict[str, Any]) -> None:
                if event["event"] == "token" and event["index"] == CUT_AT:
                    topo.partition(victim)
                    cut["at"] = time.monotonic()
                    threading.Timer(cut_s, heal).start()
                if event["event"] == "token" and event["index"] == CUT_AT + 1 and "at" in cut:
                    cut["next"] = time.monotonic()

            events = _generate(topo, url, on_event)
        finally:
            cluster.stop()

    done = next(e for e in events if e["event"] == "done")
    ref_done = next(e for e in reference if e["event"] == "done")
    failovers = [e for e in events if e["event"] == "failover"]
    print(f"cut {cut_s} s: failovers {failovers}, stall {cut.get('next', 0) - cut.get('at', 0):.1f} s")
    assert done["token_ids"] == ref_done["token_ids"]
    assert failovers, "the cut was not noticed"
    first = failovers[0]
    assert first["failed_node"] == route["nodes"][1]["name"]
    # Noticed within 5 s of the last token that made it through.
    assert first["detected_after_ms"] is not None and first["detected_after_ms"] <= 5000
    # The node had no replica: generation can only have gone on after the heal, through it again.
    assert "healed" in cut and cut["next"] >= cut["healed"]
    assert route["nodes"][1]["name"] in [n["name"] for n in failovers[-1]["new_route"]]
