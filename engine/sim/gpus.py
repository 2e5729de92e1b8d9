"""The simulated model and GPUs: what a layer costs, and how fast each card runs it.

Model: Llama-2-70B in fp16 (80 layers, hidden 8192, grouped-query attention with 8 KV heads of
128). A layer holds ~0.856 B parameters (69 B minus the embeddings, over 80), i.e. ~1.71 GB in
fp16; one token of KV cache costs 2 (K, V) x 8 heads x 128 x 2 bytes = 4096 bytes per layer. Each
node reserves a KV budget of 16,384 tokens per hosted layer: Petals' default ``attn_cache_tokens``
for grouped-query models, so both schedulers get the same memory rule.

Speeds are derived, not measured. Decoding one token at batch 1 reads every weight of a layer
once, so it is memory-bandwidth bound: ``layers_per_s = 0.75 * bandwidth / layer_bytes`` (75% of
the datasheet bandwidth is what well-tuned fp16 kernels reach). Prefill of T tokens is compute
bound: ``T * 2 * params / (0.4 * fp16 tensor FLOP/s)`` per layer (40% utilisation), never less
than one weight read. Memory is the card's, less 10% for the CUDA context and activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.scheduler.capacity import ModelShape

#: share of the datasheet memory bandwidth a batch-1 decode step achieves
BANDWIDTH_EFFICIENCY = 0.75
#: share of the datasheet fp16 tensor throughput a prefill achieves
PREFILL_EFFICIENCY = 0.4
#: share of the card's memory left for weights and KV cache
USABLE_MEMORY = 0.9


@dataclass(frozen=True)
class SimModel:
    """The per-layer costs the simulator needs (weights, KV, FLOPs, activation size)."""

    name: str
    num_layers: int
    layer_bytes: int
    params_per_layer: float
    hidden_size: int
    kv_bytes_per_token_layer: int
    kv_tokens: int

    def shape(self) -> ModelShape:
        """The scheduler's view of the model: the very object the real planner is given."""
        return ModelShape(self.num_layers, self.layer_bytes, self.kv_bytes_per_token_layer, self.kv_tokens)


LLAMA_70B = SimModel(
    name="Llama-2-70B fp16",
    num_layers=80,
    layer_bytes=1_712_000_000,
    params_per_layer=0.856e9,
    hidden_size=8192,
    kv_bytes_per_token_layer=4096,
    kv_tokens=16384,
)


@dataclass(frozen=True)
class GpuSpec:
    """A card as sold: memory, memory bandwidth, dense fp16 tensor throughput, share of the grid."""

    name: str
    memory_gb: float
    bandwidth_gbs: float
    fp16_tflops: float
    share: float

    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9 * USABLE_MEMORY)

    def layers_per_s(self, model: SimModel) -> float:
        """Decode layer-forwards per second at batch 1 (bandwidth bound; see the module docstring)."""
        return BANDWIDTH_EFFICIENCY * self.bandwidth_gbs * 1e9 / model.layer_bytes


#: Datasheet figures; shares are a guess at a volunteer grid (mostly gaming cards, some datacentre).
GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("RTX 3060", 12, 360, 51, 0.30),
    GpuSpec("RTX 3090", 24, 936, 71, 0.25),
    GpuSpec("RTX 4090", 24, 1008, 165, 0.25),
    GpuSpec("A100 80GB", 80, 2039, 312, 0.12),
    GpuSpec("H100 SXM", 80, 3350, 989, 0.08),
)


def prefill_s(model: SimModel, layers: int, tokens: int, tflops: float, layers_per_s: float) -> float:
    """Seconds to prefill (or replay) ``tokens`` tokens through ``layers`` layers on one card."""
    if layers <= 0 or tokens <= 0:
        return 0.0
    compute = tokens * 2.0 * model.params_per_layer / (PREFILL_EFFICIENCY * tflops * 1e12)
    return layers * max(compute, 1.0 / layers_per_s)
