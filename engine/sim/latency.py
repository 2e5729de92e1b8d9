"""The internet as the simulator sees it: regions, a round-trip matrix and per-host last miles.

The round trip between two hosts is the backbone RTT between their regions plus each side's last
mile (home broadband and Wi-Fi add 2-40 ms; drawn once per host, lognormal around 10 ms). The
backbone figures are typical public cloud inter-region pings. Both schedulers route on these same
figures (pings are measured in both systems); the client's view of each host is additionally
off by its own measurement error (lognormal, ``SimConfig.ping_error``), so clients in one region
do not all rank hosts exactly alike, as real ping samples do not.

That error matters for the baseline: Petals routes blind to load, so when its clients agree on
the best hosts they pile onto them. Real Petals clients ping only a few servers per minute and
assume 150 ms for the rest, which scatters their choices (and lengthens their routes); a larger
``ping_error`` approximates that scatter.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

REGIONS: tuple[str, ...] = ("us-east", "us-west", "eu-west", "asia-east")
#: share of nodes and of clients per region
REGION_SHARE: tuple[float, ...] = (0.30, 0.20, 0.30, 0.20)
#: backbone round trip in ms between regions (symmetric)
RTT_MS: tuple[tuple[float, ...], ...] = (
    (12.0, 70.0, 85.0, 200.0),
    (70.0, 12.0, 150.0, 130.0),
    (85.0, 150.0, 15.0, 230.0),
    (200.0, 130.0, 230.0, 25.0),
)
#: median one-way last-mile delay of a host (ms) and its lognormal sigma
LAST_MILE_MS = 5.0
LAST_MILE_SIGMA = 0.7


class Network:
    """Round trips between grid hosts and clients; ``rtt_for`` builds the callable routing takes."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._info: dict[str, tuple[int, float]] = {}  # host -> (region, one-way last mile ms)
        self._matrix = [list(row) for row in RTT_MS]
        self._np_matrix = np.array(RTT_MS)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, host: str, region: int, last_mile_ms: float) -> None:
        """Register a host or client (``last_mile_ms`` is one way, so a round trip pays it twice)."""
        self._pos[host] = len(self._ids)
        self._ids.append(host)
        self._info[host] = (region, last_mile_ms)
        self._arrays = None

    @property
    def size(self) -> int:
        """Hosts and clients registered."""
        return len(self._ids)

    def rtt(self, a: str, b: str) -> float:
        """True round trip in ms (what a token experiences)."""
        if a == b:
            return 0.0
        (ra, ma), (rb, mb) = self._info[a], self._info[b]
        return self._matrix[ra][rb] + 2.0 * (ma + mb)

    def rtt_for(self, client: str, error: np.ndarray | None = None) -> Callable[[str, str], float]:
        """The round-trip function a route decision for ``client`` sees.

        Host-to-host figures are exact; client-to-host ones are scaled by ``error[k]`` for the
        k-th registered host (the client's ping measurement error; ``size`` values) when given. The client's
        figures are tabulated up front: they are the measurements a coordinator holds in memory.
        """
        rc, mc = self._info[client]
        if self._arrays is None:
            self._arrays = (
                np.array([self._info[h][0] for h in self._ids]),
                np.array([self._info[h][1] for h in self._ids]),
            )
        regions, miles = self._arrays
        table = self._np_matrix[rc, regions] + 2.0 * (mc + miles)
        if error is not None:
            table = table * error
        to_client = table.tolist()
        matrix, info, pos = self._matrix, self._info, self._pos

        def rtt(a: str, b: str) -> float:
            if a == client:
                return to_client[pos[b]]
            if b == client:
                return to_client[pos[a]]
            (ra, ma), (rb, mb) = info[a], info[b]
            return matrix[ra][rb] + 2.0 * (ma + mb)

        return rtt


def ping_errors(rng: np.random.Generator, hosts: int, sigma: float) -> np.ndarray:
    """One client's multiplicative ping error for each of ``hosts`` registered hosts (lognormal, median 1)."""
    return rng.lognormal(0.0, sigma, size=hosts)
