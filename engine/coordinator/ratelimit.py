"""Token-bucket rate limits per client IP and per account: pure (no I/O, no clock), bounded memory.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; a request takes
one, and a request finding the bucket empty is refused with the seconds until a token is back
(the coordinator answers 429 with that as ``Retry-After``). A bucket that has refilled completely
is the same as no bucket, so such buckets are forgotten as requests go by (the least recently
used first, amortised O(1) per request); past ``max_keys`` live buckets the least recently used
one is forgotten even when not full. That can only let its owner through sooner, never lock
anyone out, and it caps memory at about 200 bytes per key whatever the number of addresses.

IPv6 clients are keyed by their /64: one host usually holds a whole /64, and keying by full
address would let it rotate through 2^64 keys. Clients behind a shared NAT or proxy share a
bucket (the coordinator does not trust ``X-Forwarded-For``), hence generous per-IP defaults.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.errors import ConfigError


@dataclass(frozen=True)
class Limit:
    #: tokens (requests) per second, sustained
    rate: float
    #: bucket size: requests allowed at once after a quiet spell
    burst: float

    def __post_init__(self) -> None:
        if not (0 < self.rate < 1e9 and 1 <= self.burst < 1e9):
            raise ConfigError(f"a rate limit needs a rate > 0 and a burst >= 1, got {self.rate:g}:{self.burst:g}")

    def __str__(self) -> str:
        return f"{self.rate:g}/s, burst {self.burst:g}"


def parse_limit(text: str) -> Limit | None:
    """``RATE:BURST`` (requests per second, bucket size), e.g. ``50:500``; ``off`` is no limit."""
    if text.strip().lower() == "off":
        return None
    rate, sep, burst = text.partition(":")
    try:
        return Limit(float(rate), float(burst) if sep else max(1.0, 10 * float(rate)))
    except ValueError:
        raise ConfigError(f"a rate limit is RATE:BURST (e.g. 50:500) or 'off', got {text!r}") from None


@dataclass(frozen=True)
class RateLimits:
    """What the coordinator enforces. Sized for honest peers with room to spare: a node makes ~10
    requests when it starts, a generation ~10 plus a report every 15 s, a failover asks for a route
    5 times a second while it waits."""

    #: every HTTP request and WebSocket upgrade, per client IP (IPv6: per /64); None: no limit
    per_ip: Limit | None = field(default_factory=lambda: Limit(50.0, 500.0))
    #: authenticated requests, session exchanges and hellos, per account; None: no limit
    per_account: Limit | None = field(default_factory=lambda: Limit(20.0, 200.0))
    #: positions spot checks may recompute, per account (auth off: per client IP). An audit costs
    #: the coordinator a prefill over every position it covers (up to 2,048), ~1,000-2,000 per
    #: second on 2 CPU cores: one account must not be able to keep the verifier to itself. A
    #: check every 4th step of a 160-token generation asks ~550 positions/s.
    audit_positions: Limit | None = field(default_factory=lambda: Limit(2_000.0, 100_000.0))
    #: buckets kept per limit at most (memory bound)
    max_keys: int = 100_000


class Buckets:
    """One token bucket per key under one ``Limit``."""

    def __init__(self, limit: Limit, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ConfigError("max_keys must be at least 1")
        self.limit = limit
        self.max_keys = max_keys
        #: key -> [tokens left, time of the last update]; least recently used first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens (at most a burst) for ``key`` at time ``now`` (seconds, monotonic):
        0.0 when allowed, else the seconds until they are back (nothing is taken then)."""
        self._forget_full(now)
        limit = self.limit
        bucket = self._buckets.get(key)
        if bucket is None:
            tokens = limit.burst
        else:
            tokens = min(limit.burst, bucket[0] + max(0.0, now - bucket[1]) * limit.rate)
            self._buckets.move_to_end(key)
        wait, cost = 0.0, min(cost, limit.burst)
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / limit.rate
        self._buckets[key] = [tokens, now]
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def _forget_full(self, now: float) -> None:
        limit = self.limit
        while self._buckets:
            tokens, last = next(iter(self._buckets.values()))
            if tokens + (now - last) * limit.rate < limit.burst:
                return
            self._buckets.popitem(last=False)


def retry_after(wait_s: float) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))


def client_key(remote: str | None) -> str:
    """The per-IP key of a peer address: the address itself, or its /64 for IPv6."""
    if not remote:
        return "unknown"
    if ":" not in remote:  # IPv4 as the socket reports it (parsing costs ~50 us a request)
        return remote
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)  # pragma: no cover - an IPv4 address has no ':'
