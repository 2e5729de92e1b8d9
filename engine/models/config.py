"""Architecture description parsed from a Hugging Face ``config.json``.

One frozen dataclass covers the Llama family we run (Llama 2/3, Mistral, Qwen2, SmolLM2): they
differ only in a few switches (qkv bias, rope scaling, sliding window), so one model class with
flags beats one class per family. Both the transformers 4.x (``rope_theta`` + ``rope_scaling``)
and 5.x (``rope_parameters``) spellings are accepted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelFormatError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
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

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def flops_per_token_layer(self) -> int:
        """Multiply-accumulate FLOPs (x2) of one decoder layer for one token, ignoring attention scores."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads, self.kv_dim
        attn = h * q * self.head_dim + 2 * h * kv + q * self.head_dim * h
        mlp = 3 * h * i
        return 2 * (attn + mlp)

    def flops_per_token_head(self) -> int:
        return 2 * self.hidden_size * self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
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
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    return ModelConfig(
        model_type=model_type,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=_int(raw, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=int(window) if isinstance(window, int) and window > 0 else None,
        bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
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
