"""Fixtures for the WAN-emulation tests: a skip when the machine cannot run them, and a topology.

Tests that need namespaces use the `wan_root` fixture (directly or through `topology`), so on a
machine without root, iptables or NetfilterQueue they skip with the reason; the pure delay-line
tests in this folder run everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.wanemu import Topology, unavailable_reason


@pytest.fixture(scope="session")
def wan_root() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def topology(wan_root: None) -> Iterator[Topology]:
    """Two hosts, ``a`` and ``b``, unshaped."""
    with Topology(["a", "b"], seed=1234) as topo:
        yield topo
