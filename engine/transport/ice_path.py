"""Which ICE candidate pair a WebRTC link ended up on: direct (host/srflx) or through a TURN relay.

Why: behind NATs and firewalls a link may only work through the relay, and a relayed link costs
the relay's bandwidth and an extra hop of latency; operators and tests need to know which one a
link took. aiortc 1.16 has no ``getStats`` for candidate pairs, so this reads aioice's nominated
pair through aiortc's (stable, but private) attributes and answers None if they ever change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiortc import RTCPeerConnection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IcePath:
    """The nominated pair of a link: candidate types ("host", "srflx", "prflx", "relay") and addresses."""

    local_type: str
    remote_type: str
    local: tuple[str, int]
    remote: tuple[str, int]

    @property
    def relayed(self) -> bool:
        """True if either end of the pair is a TURN relay candidate (the data crosses the relay)."""
        return "relay" in (self.local_type, self.remote_type)


def selected_path(pc: RTCPeerConnection) -> IcePath | None:
    """The pair ``pc``'s data channel transport uses (component 1), or None before ICE completes."""
    try:
        sctp = pc.sctp
        if sctp is None:
            return None
        connection = sctp.transport.transport._connection
        pair = connection._nominated.get(1)
        if pair is None:
            return None
        local, remote = pair.local_candidate, pair.remote_candidate
        return IcePath(local.type, remote.type, (local.host, local.port), (remote.host, remote.port))
    except AttributeError:
        log.debug("cannot read the nominated ICE pair from this aiortc/aioice version", exc_info=True)
        return None
