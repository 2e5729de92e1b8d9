"""Architecture description parsed from a Hugging Face ``config.json``.

One frozen dataclass covers the Llama family we run (Llama 2/3, Mistral, Qwen2, SmolLM2) and its
Mixture-of-Experts relatives (Mixtral, Qwen2-MoE): they differ only in a few switches (qkv bias,
rope scaling, sliding window, which layers route their MLP through experts), so one model class
with flags beats one class per family. Both the transformers 4.x (``rope_theta`` +
``rope_scaling``) and 5.x (``rope_parameters``) spellings are accepted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelFormatError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to build and run a Llama-family network."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    #: rope scaling parameters with a ``rope_type`` key, or an empty dict for plain rope.
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    #: bias on q/k/v projections (Qwen2 always, Llama when ``attention_bias``).
    qkv_bias: bool = False
    #: bias on the output projection (Llama ``attention_bias`` only).
    o_bias: bool = False
    mlp_bias: bool = False
    #: attend only to the last N positions (Mistral); None means full causal attention.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    #: routed experts in each MoE layer; 0 for a dense model.
    num_experts: int = 0
    #: experts each token is routed to (top-k).
    num_experts_per_tok: int = 0
    #: hidden width of one routed expert's SwiGLU (Mixtral: its ``intermediate_size``).
    moe_intermediate_size: int = 0
    #: rescale the top-k routing weights to sum to 1 (Mixtral always; Qwen2-MoE ``norm_topk_prob``).
    norm_topk_prob: bool = False
    #: width of the always-on shared expert (Qwen2-MoE); 0 means none.
    shared_expert_intermediate_size: int = 0
    #: absolute indices of the layers whose MLP is a sparse MoE block; the others are dense SwiGLU.
    moe_layers: tuple[int, ...] = ()

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def _attention_flops(self) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.kv_dim
        return 2 * (h * q + 2 * h * kv + q * h)

    def expert_flops_per_token(self) -> int:
        """FLOPs of one routed expert on one token: the unit that routing runs or skips."""
        return 2 * 3 * self.hidden_size * self.moe_intermediate_size

    def _mlp_flops(self, layer: int) -> int:
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 2 * 3 * h * self.intermediate_size
        router = 2 * h * self.num_experts
        shared = 2 * (3 * h * self.shared_expert_intermediate_size + h) if self.shared_expert_intermediate_size else 0
        return router + shared + self.num_experts_per_tok * self.expert_flops_per_token()

    def flops_per_token_layer(self, layer: int | None = None) -> int:
        """Multiply-accumulate FLOPs (x2) of one decoder layer for one token, ignoring attention scores.

        A MoE layer counts only the top-k experts a token actually runs (plus router and shared
        expert): that is what the token costs. ``layer=None`` is the mean over the model's layers,
        which for a dense model (and Mixtral) is every layer's figure.
        """
        if layer is None:
            return self.flops_per_token_layers(0, self.num_hidden_layers) // self.num_hidden_layers
        return self._attention_flops() + self._mlp_flops(layer)

    def flops_per_token_layers(self, start: int, end: int) -> int:
        """Exact per-token FLOPs of layers ``[start, end)`` (layers differ when only some are MoE)."""
        if not self.is_moe:
            return (end - start) * (self._attention_flops() + self._mlp_flops(0))
        return sum(self.flops_per_token_layer(i) for i in range(start, end))

    def flops_per_token_head(self) -> int:
        return 2 * self.hidden_size * self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["moe_layers"] = list(self.moe_layers)
        return d


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelFormatError(f"config.json: '{key}' must be a positive integer, got {value!r}")
    return value


def _float(raw: dict[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ModelFormatError(f"config.json: '{key}' must be a positive number, got {value!r}")
    return float(value)


_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ModelFormatError(f"config.json: bad eos_token_id {value!r}")


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = _float({**raw, **params}, "rope_theta", 10000.0)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = _float(raw, "rope_theta", 10000.0)
        given = raw.get("rope_scaling") or {}
        if not isinstance(given, dict):
            raise ModelFormatError(f"config.json: 'rope_scaling' must be an object, got {given!r}")
        scaling = dict(given)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFormatError(f"unsupported rope scaling '{rope_type}' (supported: {SUPPORTED_ROPE_TYPES})")
    for key in _ROPE_KEYS.get(rope_type, ()):
        _float(scaling, key, float("nan"))  # required and a positive number
    return theta, ({} if rope_type == "default" else scaling)


def _layer_list(raw: dict[str, Any], key: str, num_layers: int) -> frozenset[int]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ModelFormatError(f"config.json: '{key}' must be a list of layer indices, got {value!r}")
    if any(not 0 <= v < num_layers for v in value):
        raise ModelFormatError(f"config.json: '{key}' names a layer outside 0-{num_layers - 1}: {value!r}")
    return frozenset(value)


def _moe_fields(raw: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """The MoE switches, following transformers' ``MixtralConfig`` / ``Qwen2MoeConfig`` semantics.

    Mixtral routes every layer through ``num_local_experts`` experts of width ``intermediate_size``
    and always renormalises the top-k weights. Qwen2-MoE has a shared expert, renormalises only
    with ``norm_topk_prob``, and makes layer i sparse when ``(i + 1) % decoder_sparse_step == 0``
    and i is not in ``mlp_only_layers`` (the others keep a dense MLP of ``intermediate_size``).
    """
    if model_type == "mixtral":
        experts, width = _int(raw, "num_local_experts", 8), _int(raw, "intermediate_size")
        fields = dict(norm_topk_prob=True, shared_expert_intermediate_size=0)
        sparse = tuple(range(num_layers))
    else:
        experts = raw.get("num_experts", 60)
        if not isinstance(experts, int) or isinstance(experts, bool) or experts < 0:
            raise ModelFormatError(f"config.json: 'num_experts' must be a non-negative integer, got {experts!r}")
        width = _int(raw, "moe_intermediate_size", 1408)
        step = _int(raw, "decoder_sparse_step", 1)
        dense_only = _layer_list(raw, "mlp_only_layers", num_layers)
        sparse = tuple(i for i in range(num_layers) if experts and i not in dense_only and (i + 1) % step == 0)
        fields = dict(
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=_int(raw, "shared_expert_intermediate_size", 5632),
        )
    top_k = _int(raw, "num_experts_per_tok", 2 if model_type == "mixtral" else 4)
    if sparse and top_k > experts:
        raise ModelFormatError(f"config.json: num_experts_per_tok {top_k} exceeds the {experts} experts")
    if not sparse:
        return dict(moe_layers=())
    return dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=width,
        moe_layers=sparse,
        **fields,
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Validate a config.json dictionary; raise ``ModelFormatError`` naming the first problem."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFormatError(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelFormatError(f"unsupported hidden_act {act!r} (only silu)")
    heads = _int(raw, "num_attention_heads")
    hidden = _int(raw, "hidden_size")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ModelFormatError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = _int(raw, "head_dim", hidden // heads)
    theta, scaling = _rope(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen2_moe") and not raw.get("use_sliding_window", False):
        window = None
    elif model_type == "qwen2_moe":
        # transformers gives Qwen2-MoE a window on only some layers (``layer_types``); we have one
        # window for all layers, so refuse rather than run a different model.
        raise ModelFormatError("qwen2_moe with use_sliding_window is not supported (per-layer windows)")
    num_layers = _int(raw, "num_hidden_layers")
    moe = _moe_fields(raw, model_type, num_layers) if model_type in MOE_MODEL_TYPES else {}
    qwen = model_type in ("qwen2", "qwen2_moe")
    # Qwen2 always has q/k/v biases; Qwen2-MoE has them unless its (transformers 5) ``qkv_bias`` says no.
    qkv_bias = bool(raw.get("qkv_bias", True)) if model_type == "qwen2_moe" else model_type == "qwen2"
    return ModelConfig(
        model_type=model_type,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias or attention_bias,
        o_bias=not qwen and attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=int(window) if isinstance(window, int) and window > 0 else None,
        bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        **moe,
    )


def load_config(folder: Path) -> ModelConfig:
    """Read ``folder/config.json``; a missing or unreadable file is a ``ModelFormatError``."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    return parse_config(raw)
