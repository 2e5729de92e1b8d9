"""A compact Llama-family decoder that can be cut into fragments.

One ``FragmentModel`` runs a contiguous range of decoder layers, optionally with the token
embeddings in front and the final norm + LM head behind. The whole model is simply the fragment
that has everything, so the local reference path and the distributed path execute the very same
code, which is what makes token-identical distributed output possible.

Weights use Hugging Face names on disk (``model.layers.N.self_attn.q_proj.weight`` ...); at load
time q/k/v and gate/up are fused into single matmuls, which matters on CPUs where batch-1 decode
is dominated by per-op overhead. Mixtral / Qwen2-MoE layers swap the dense MLP for the sparse
expert block of ``engine.models.moe``; dense layers run exactly the code they always did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ModelFormatError, SessionError
from engine.models.config import ModelConfig
from engine.models.kv_cache import KVCache
from engine.models.moe import SparseMoeBlock
from engine.models.moe_weights import moe_layer_names


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies with the config's scaling applied (HF semantics)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RotaryTable:
    """cos/sin for positions, computed once per forward pass and shared by all layers."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.inv_freq = rope_inv_freq(cfg)

    def __call__(self, start: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        pos = torch.arange(start, start + length, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op in fp32 (HF normalises in fp32 too); per-op overhead dominates batch-1 decode.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class AttentionLayer(nn.Module):
    """The attention half of a decoder layer (pre-norm, GQA, rope, fused qkv) and both norms.

    Dense and MoE layers differ only in the MLP after ``post_attention_layernorm``; ``attend``
    is separate so a distributed MoE layer can run attention and routing on one node and the
    experts elsewhere.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.kv_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def attend(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer_slot: int,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x`` plus self-attention over it (and the cached positions): the residual stream after attention."""
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        qk, v = self.qkv(h).split((self.q_size + self.kv_size, self.kv_size), dim=-1)
        # Rope on queries and keys together: one set of ops instead of two.
        qk = qk.view(b, t, cfg.num_attention_heads + cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk.split((cfg.num_attention_heads, cfg.num_key_value_heads), dim=1)
        v = v.view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(layer_slot, start, k, v)
        if mask is None and cfg.sliding_window is not None and t == 1 and k.shape[2] > cfg.sliding_window:
            k, v = k[:, :, -cfg.sliding_window :], v[:, :, -cfg.sliding_window :]
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=True
        )
        return x + self.o_proj(attn.transpose(1, 2).reshape(b, t, self.q_size))

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP's update for the normalised stream ``h`` (dense or experts: the subclass's)."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer_slot: int,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.attend(x, cos, sin, cache, layer_slot, start, mask)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class DecoderLayer(AttentionLayer):
    """Attention + SwiGLU MLP, with fused qkv and gate/up projections."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The SwiGLU MLP's update for the normalised stream ``h``."""
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MoEDecoderLayer(AttentionLayer):
    """Attention + a sparse Mixture-of-Experts MLP (``engine.models.moe``)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg)
        self.moe = SparseMoeBlock(cfg, layer)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The experts' (and shared expert's) update for the normalised stream ``h``."""
        return self.moe(h)


#: ``FragmentModel.forward(run_layer=...)``: (absolute index, layer, x, cos, sin, cache, slot, start, mask) -> x
LayerRunner = Callable[
    [int, "AttentionLayer", torch.Tensor, torch.Tensor, torch.Tensor, KVCache | None, int, int, torch.Tensor | None],
    torch.Tensor,
]


def make_layer(cfg: ModelConfig, layer: int) -> DecoderLayer | MoEDecoderLayer:
    """The decoder layer at absolute index ``layer``: MoE where the config routes that layer's MLP."""
    return MoEDecoderLayer(cfg, layer) if cfg.is_moe_layer(layer) else DecoderLayer(cfg)


def attention_mask(start: int, length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for queries at ``start..start+length`` over keys ``0..start+length``.

    Returns None where SDPA's own handling is exact: one query without a window, or a causal
    prefill from position 0 without a window.
    """
    if window is None and (length == 1 or start == 0):
        return None
    q_pos = torch.arange(start, start + length, device=device).unsqueeze(1)
    k_pos = torch.arange(0, start + length, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


class FragmentModel(nn.Module):
    """Layers ``[start, end)`` of a Llama-family (or MoE) model, with embeddings and/or head when held.

    ``forward`` takes token ids (B, T) when the fragment has the embeddings, hidden states
    (B, T, H) otherwise; it returns hidden states, or logits when the fragment has the head.
    """

    def __init__(self, cfg: ModelConfig, start: int, end: int, *, embed: bool, head: bool) -> None:
        super().__init__()
        if not 0 <= start <= end <= cfg.num_hidden_layers:
            raise ModelFormatError(f"layer range {start}-{end} outside 0-{cfg.num_hidden_layers}")
        self.cfg = cfg
        self.start, self.end = start, end
        self.has_embed, self.has_head = embed, head
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if embed else None
        self.layers = nn.ModuleList(make_layer(cfg, i) for i in range(start, end))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if head else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if head else None
        self.rotary = RotaryTable(cfg)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def new_cache(self, max_tokens: int, batch: int = 1) -> KVCache:
        p = next(self.parameters())
        return KVCache(
            self.num_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            max_tokens,
            dtype=p.dtype,
            device=p.device,
            batch=batch,
        )

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        cache: KVCache | None = None,
        *,
        all_logits: bool = False,
        skip: frozenset[int] = frozenset(),
        first: int | None = None,
        run_layer: LayerRunner | None = None,
    ) -> torch.Tensor:
        """Run the fragment at positions ``start_pos..start_pos+T``; ``skip`` names absolute layers to bypass.

        ``run_layer`` replaces each layer's own forward (``engine.sparsity.runner`` skips
        sub-blocks and neurons and observes the residual stream this way), called with the
        layer's absolute index followed by the layer's forward arguments.

        ``first`` (an absolute layer, default the fragment's start) enters the fragment part-way: a
        route may join a node's span in the middle, and then the input is hidden states, so the
        embeddings run only when starting at the fragment's start.
        """
        begin = self.start if first is None else first
        if not self.start <= begin < max(self.end, self.start + 1):
            raise SessionError(f"cannot enter layers {self.start}-{self.end} at layer {begin}")
        if self.embed_tokens is not None and begin == self.start:
            x = self.embed_tokens(x)
        p = self.layers[0].qkv.weight if len(self.layers) else x
        x = x.to(p.dtype)
        t = x.shape[1]
        if cache is not None and cache.length != start_pos:
            raise SessionError(f"position {start_pos} does not follow the cached {cache.length} positions")
        if len(self.layers):
            cos, sin = self.rotary(start_pos, t, x.dtype, x.device)
            mask = attention_mask(start_pos, t, self.cfg.sliding_window, x.device)
            for slot, layer in enumerate(self.layers):
                index = self.start + slot
                if index < begin or index in skip:
                    continue
                if run_layer is None:
                    x = layer(x, cos, sin, cache, slot, start_pos, mask)
                else:
                    x = run_layer(index, layer, x, cos, sin, cache, slot, start_pos, mask)
        if cache is not None:
            cache.length = start_pos + t
        if self.norm is None or self.lm_head is None:
            return x
        if not all_logits:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    def load_hf_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fill parameters from HF-named tensors; only the ones this fragment needs must be present."""

        def take(name: str) -> torch.Tensor:
            t = tensors.get(name)
            if t is None:
                raise ModelFormatError(f"weights are missing tensor '{name}'")
            return t

        def put(param: torch.Tensor, name: str, *names: str) -> None:
            src = torch.cat([take(n) for n in (name, *names)], 0) if names else take(name)
            if src.shape != param.shape:
                raise ModelFormatError(f"tensor '{name}' has shape {tuple(src.shape)}, expected {tuple(param.shape)}")
            param.copy_(src)

        with torch.no_grad():
            if self.embed_tokens is not None:
                put(self.embed_tokens.weight, "model.embed_tokens.weight")
            for slot, layer in enumerate(self.layers):
                pre = f"model.layers.{self.start + slot}."
                att, mlp = pre + "self_attn.", pre + "mlp."
                put(layer.qkv.weight, att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight")
                if layer.qkv.bias is not None:
                    put(layer.qkv.bias, att + "q_proj.bias", att + "k_proj.bias", att + "v_proj.bias")
                put(layer.o_proj.weight, att + "o_proj.weight")
                if layer.o_proj.bias is not None:
                    put(layer.o_proj.bias, att + "o_proj.bias")
                if isinstance(layer, MoEDecoderLayer):
                    self._load_moe(layer.moe, put)
                else:
                    put(layer.gate_up.weight, mlp + "gate_proj.weight", mlp + "up_proj.weight")
                    put(layer.down_proj.weight, mlp + "down_proj.weight")
                    if layer.gate_up.bias is not None and layer.down_proj.bias is not None:
                        put(layer.gate_up.bias, mlp + "gate_proj.bias", mlp + "up_proj.bias")
                        put(layer.down_proj.bias, mlp + "down_proj.bias")
                put(layer.input_layernorm.weight, pre + "input_layernorm.weight")
                put(layer.post_attention_layernorm.weight, pre + "post_attention_layernorm.weight")
            if self.norm is not None and self.lm_head is not None:
                put(self.norm.weight, "model.norm.weight")
                tied = self.cfg.tie_word_embeddings and "lm_head.weight" not in tensors
                put(self.lm_head.weight, "model.embed_tokens.weight" if tied else "lm_head.weight")

    def _load_moe(self, block: SparseMoeBlock, put: Callable[..., None]) -> None:
        names = moe_layer_names(self.cfg, block.layer)
        put(block.router.weight, names.router)
        for expert, n in enumerate(names.experts[: block.experts.count]):  # none in a trunk: experts are remote
            gate_up, down = block.experts.params(expert)
            put(gate_up, n.gate, n.up)
            put(down, n.down)
        if block.shared is not None and names.shared is not None and names.shared_gate is not None:
            put(block.shared.gate_up.weight, names.shared.gate, names.shared.up)
            put(block.shared.down_proj.weight, names.shared.down)
            put(block.shared.gate.weight, names.shared_gate)


def hf_tensor_names(cfg: ModelConfig, start: int, end: int, *, embed: bool, head: bool) -> list[str]:
    """The HF tensor names a fragment needs (what packing copies into the fragment's file)."""
    names = ["model.embed_tokens.weight"] if embed else []
    for i in range(start, end):
        pre = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            names.append(f"{pre}self_attn.{n}_proj.weight")
        if cfg.qkv_bias:
            names += [f"{pre}self_attn.{n}_proj.bias" for n in ("q", "k", "v")]
        if cfg.o_bias:
            names.append(f"{pre}self_attn.o_proj.bias")
        if cfg.is_moe_layer(i):
            names += moe_layer_names(cfg, i).all()
        else:
            for n in ("gate", "up", "down"):
                names.append(f"{pre}mlp.{n}_proj.weight")
                if cfg.mlp_bias:
                    names.append(f"{pre}mlp.{n}_proj.bias")
        names += [pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"]
    if head:
        names += ["model.norm.weight", "lm_head.weight"]
    return names
