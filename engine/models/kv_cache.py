"""Per-session key/value cache for a run of decoder layers.

Buffers grow by doubling up to a fixed maximum, so decode appends are amortised O(1) copies and a
session's memory is bounded by ``max_tokens`` (the executor checks that bound against the node's
budget before admitting a session).
"""

from __future__ import annotations

import torch

from engine.errors import SessionError

_INITIAL_CAPACITY = 128


class KVCache:
    """Keys and values (after rope) of ``num_layers`` consecutive layers, batch dimension first."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_tokens: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        batch: int = 1,
    ) -> None:
        self.num_layers = num_layers
        self.max_tokens = max_tokens
        self._shape = (batch, num_kv_heads, 0, head_dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        #: number of valid positions (the same for every layer once a forward pass is complete)
        self.length = 0

    @staticmethod
    def bytes_for(num_layers: int, num_kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype) -> int:
        """Upper bound of the memory a cache of ``tokens`` positions takes (used for admission)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * tokens * itemsize

    def _ensure(self, layer: int, needed: int) -> None:
        keys = self._keys[layer]
        capacity = 0 if keys is None else keys.shape[2]
        if needed <= capacity:
            return
        if needed > self.max_tokens:
            raise SessionError(f"session exceeds its context limit of {self.max_tokens} tokens")
        new_cap = min(self.max_tokens, max(_INITIAL_CAPACITY, capacity * 2, needed))
        b, h, _, d = self._shape
        new_k = torch.empty((b, h, new_cap, d), dtype=self._dtype, device=self._device)
        new_v = torch.empty_like(new_k)
        if keys is not None:
            values = self._values[layer]
            new_k[:, :, :capacity] = keys
            new_v[:, :, :capacity] = values
        self._keys[layer] = new_k
        self._values[layer] = new_v

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (B, kvh, T, d) at positions ``start..start+T`` and return all keys/values so far."""
        end = start + k.shape[2]
        self._ensure(layer, end)
        keys, values = self._keys[layer], self._values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget positions ``>= length`` (used to roll back rejected speculative tokens)."""
        if length < 0 or length > self.length:
            raise SessionError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values if t is not None)
