"""Whether this machine can run the WAN harness, and if not, why.

Why: the harness needs root, `ip netns`, iptables with the NFQUEUE target, and the NetfilterQueue
package; tests and benches skip with the reason instead of failing half-way through a set-up.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import uuid

from engine.wanemu._sh import WanEmuError, in_netns, run


@functools.cache
def unavailable_reason() -> str | None:
    """None when the harness can run here, else a one-line reason (cached: it creates a namespace)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "WAN emulation needs root (network namespaces, iptables)"
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            return f"WAN emulation needs `{tool}` (apt-get install iproute2 iptables)"
    if importlib.util.find_spec("netfilterqueue") is None:
        return "WAN emulation needs the NetfilterQueue package (pip install NetfilterQueue)"
    probe = f"kwanprobe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        run(["ip", "netns", "add", probe])
        run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"])
        run(in_netns(probe, ["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1"]))
        run(in_netns(probe, ["iptables", "-A", "FORWARD", "-s", "10.255.0.1", "-j", "NFQUEUE", "--queue-num", "1"]))
    except WanEmuError as exc:
        return f"WAN emulation cannot set up a bridged namespace with an NFQUEUE rule here: {exc}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


def root_available() -> bool:
    """True when running as root and namespaces, iptables NFQUEUE and NetfilterQueue all work."""
    return unavailable_reason() is None
