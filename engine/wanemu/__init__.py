"""WAN emulation for tests and benches: hosts in network namespaces with delay, loss, rate, partitions.

Why its own package: the real transport (aiortc over UDP, the aiohttp coordinator) has to be
measured and tested across a WAN, and this kernel has no netem. See `topology` for the layout and
`delayer` for the NFQUEUE program. Needs root, `ip`, `tc`, `iptables` and NetfilterQueue;
`root_available()` says whether they work here. `turnserver` runs a real coturn on a host (NAT
traversal tests).

    with Topology(["coord", "a", "b"]) as topo:
        topo.set_link("a", delay_ms=40, loss=0.01, rate_mbit=50)
        proc = topo.host("a").popen(["python", "-m", "engine.cli", ...])
"""

from engine.wanemu._sh import WanEmuError
from engine.wanemu.availability import root_available, unavailable_reason
from engine.wanemu.cleanup import cleanup_leftovers
from engine.wanemu.link import LinkShape
from engine.wanemu.topology import Host, Topology

__all__ = [
    "Host",
    "LinkShape",
    "Topology",
    "WanEmuError",
    "cleanup_leftovers",
    "root_available",
    "unavailable_reason",
]
