"""What a node can hold and how fast it computes, and what one layer of a model costs.

These are the only inputs the span planner (``spans``) trusts. Throughput is the figure a node
MEASURED with its own short benchmark (``layers_per_s``: layer-forward passes per second for one
decode token); a figure a node merely claims is kept in ``claimed_layers_per_s`` so that logs and
tests can show it is never used: a node that overstates its speed must not be handed more layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import ConfigError


def _check_int(name: str, value: object, *, minimum: int) -> None:
    # bool is an int subclass; a flag passed where a byte count belongs is a caller bug.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_rate(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class NodeCapacity:
    """A node as the span planner sees it.

    ``memory_bytes`` is what the node offers the grid (weights plus KV cache). ``layers_per_s`` is
    measured; 0 means the benchmark failed and the node is given no layers. ``claimed_layers_per_s``
    is deliberately ignored by every planning function.
    """

    node_id: str
    memory_bytes: int
    layers_per_s: float
    claimed_layers_per_s: float | None = None
    region: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ConfigError(f"node_id must be a non-empty string, got {self.node_id!r}")
        _check_int(f"memory_bytes of node '{self.node_id}'", self.memory_bytes, minimum=0)
        _check_rate(f"layers_per_s of node '{self.node_id}'", self.layers_per_s)
        if self.claimed_layers_per_s is not None:
            _check_rate(f"claimed_layers_per_s of node '{self.node_id}'", self.claimed_layers_per_s)
        if not isinstance(self.region, str):
            raise ConfigError(f"region of node '{self.node_id}' must be a string, got {self.region!r}")


@dataclass(frozen=True)
class ModelShape:
    """The per-layer cost of a model: weights plus a KV-cache budget of ``kv_tokens`` tokens.

    The KV budget is reserved up front because a node that fills its memory with weights alone
    would accept a session and then fail mid-generation when the cache grows.
    """

    num_layers: int
    layer_bytes: int
    kv_bytes_per_token_layer: int
    kv_tokens: int = 2048

    def __post_init__(self) -> None:
        _check_int("num_layers", self.num_layers, minimum=1)
        _check_int("layer_bytes", self.layer_bytes, minimum=1)
        _check_int("kv_bytes_per_token_layer", self.kv_bytes_per_token_layer, minimum=0)
        _check_int("kv_tokens", self.kv_tokens, minimum=0)

    @property
    def bytes_per_layer(self) -> int:
        """Memory one hosted layer needs: its weights plus its share of the KV budget."""
        return self.layer_bytes + self.kv_bytes_per_token_layer * self.kv_tokens

    def max_layers(self, node: NodeCapacity) -> int:
        """How many layers fit in ``node``'s memory (never more than the model has)."""
        return min(self.num_layers, node.memory_bytes // self.bytes_per_layer)
