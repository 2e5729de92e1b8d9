"""Calibration, the skip runner and importance in manifests on the tiny model; the bench on the real one."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.cli import main
from engine.errors import ConfigError, FragmentError
from engine.fragments.manifest import MANIFEST, parse_manifest, read_manifest
from engine.fragments.pack import pack_model
from engine.models.loading import load_model
from engine.sparsity import runner
from engine.sparsity.budget import SkipPlan
from engine.sparsity.calibrate import InfluenceSums, drop_one_losses, influence, layer_importance
from engine.sparsity.importance import (
    CALIBRATION_FILE,
    METRIC,
    Calibration,
    Importance,
    parse_calibration,
    read_calibration,
    write_calibration,
)


def tiny_calibration(folder: Path, *, losses: bool = True) -> Calibration:
    model = load_model(folder)
    torch.manual_seed(1)
    windows = [torch.randint(0, model.cfg.vocab_size, (24,)).tolist() for _ in range(2)]
    layers = layer_importance(model, windows)
    if losses:
        layers = drop_one_losses(model, windows[:1], layers)
    return Calibration(
        model_id="tiny-llama",
        num_layers=model.cfg.num_hidden_layers,
        config_sha256=hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        window=24,
        importance=Importance(METRIC, "0" * 64, 48, layers, 24 if losses else 0),
    )


# ---------------------------------------------------------------- the runner against the model code


def test_runner_reproduces_the_model_dense_and_with_skipped_layers(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    for skip in (frozenset(), frozenset({2, 4})):
        expected = model(ids, 0, None, all_logits=True, skip=skip)
        got = runner.forward(model, ids, 0, None, SkipPlan(layers=skip), all_logits=True)
        assert torch.equal(got, expected)
    # decode steps with a KV cache: prefill, then one token at a time, as a node runs them
    ref_cache, cache = model.new_cache(16), model.new_cache(16)
    plan = SkipPlan(layers=frozenset({3}))
    assert torch.equal(model(ids, 0, ref_cache, skip=plan.layers), runner.forward(model, ids, 0, cache, plan))
    for pos, token in enumerate((7, 11, 13), start=ids.shape[1]):
        step = torch.tensor([[token]])
        assert torch.equal(model(step, pos, ref_cache, skip=plan.layers), runner.forward(model, step, pos, cache, plan))


def test_skipping_a_sub_block_changes_the_output_and_both_halves_equal_the_layer(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    dense = runner.forward(model, ids, 0, None, SkipPlan(), all_logits=True)
    no_attn = runner.forward(model, ids, 0, None, SkipPlan(attention=frozenset({2})), all_logits=True)
    no_mlp = runner.forward(model, ids, 0, None, SkipPlan(mlp=frozenset({2})), all_logits=True)
    both = runner.forward(model, ids, 0, None, SkipPlan(attention=frozenset({2}), mlp=frozenset({2})), all_logits=True)
    assert not torch.allclose(no_attn, dense) and not torch.allclose(no_mlp, dense)
    assert torch.equal(both, runner.forward(model, ids, 0, None, SkipPlan(layers=frozenset({2})), all_logits=True))


def test_neuron_sparsity_decode_gather_equals_prefill_mask(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    ids = [5, 17, 42, 8, 99, 3]
    plan = SkipPlan(neuron_keep=0.5, neuron_layers=frozenset(range(1, 5)))
    full = runner.forward(model, torch.tensor([ids]), 0, None, plan, all_logits=True)
    cache = model.new_cache(8)
    runner.forward(model, torch.tensor([ids[:-1]]), 0, cache, plan)
    step = runner.forward(model, torch.tensor([ids[-1:]]), len(ids) - 1, cache, plan)
    torch.testing.assert_close(step[0, -1], full[0, -1], rtol=1e-5, atol=1e-5)
    dense = runner.forward(model, torch.tensor([ids]), 0, None, SkipPlan(), all_logits=True)
    keep_all = SkipPlan(neuron_keep=1.0, neuron_layers=frozenset(range(6)))
    assert torch.equal(runner.forward(model, torch.tensor([ids]), 0, None, keep_all, all_logits=True), dense)
    assert not torch.allclose(full, dense)


# ---------------------------------------------------------------- calibration


def test_influence_is_zero_for_no_change_and_two_for_reversal() -> None:
    x = torch.randn(1, 4, 8)
    assert torch.allclose(influence(x, x), torch.zeros(1, 4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(influence(x, 3 * x), torch.zeros(1, 4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(influence(x, -x), torch.full((1, 4), 2.0, dtype=torch.float64))
    sums = InfluenceSums(2)
    sums(0, x, x, -x)
    sums(1, x, -x, -x)
    got = sums.scores()
    assert (got[0].bi, got[0].attn_bi, got[0].mlp_bi) == pytest.approx((2.0, 0.0, 2.0))
    assert (got[1].bi, got[1].attn_bi, got[1].mlp_bi) == pytest.approx((2.0, 2.0, 0.0))


@pytest.mark.parametrize("losses", [True, False])
def test_calibration_on_the_tiny_model(tiny_model_dir: Path, losses: bool) -> None:
    cal = tiny_calibration(tiny_model_dir, losses=losses)
    layers = cal.importance.layers
    assert [li.layer for li in layers] == list(range(6)) and cal.importance.has_loss == losses
    for li in layers:
        for score in (li.bi, li.attn_bi, li.mlp_bi):
            assert math.isfinite(score) and 0.0 <= score <= 2.0
        assert li.bi > 0  # a random layer always turns the stream a little
        drop = (li.loss, li.attn_loss, li.mlp_loss)
        assert all(d is not None and math.isfinite(d) and d > -1 for d in drop) if losses else drop == (None,) * 3
    # JSON round trip of the whole record
    assert parse_calibration(json.loads(json.dumps(cal.to_json()))) == cal


def test_calibration_needs_the_whole_model(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="whole model"):
        layer_importance(load_model(tiny_model_dir, 2, 4), [[1, 2, 3]])


# ---------------------------------------------------------------- importance in manifests


def test_pack_copies_each_fragments_importance_into_its_manifest(tiny_model_dir: Path, tmp_path: Path) -> None:
    cal = tiny_calibration(tiny_model_dir)
    path = tmp_path / CALIBRATION_FILE
    write_calibration(path, cal)
    assert read_calibration(path) == cal
    manifests = pack_model(
        tiny_model_dir, tmp_path / "pack", 3, model_id="tiny-llama", progress=False, calibration=path
    )
    for m in manifests:
        assert m.importance is not None
        assert [li.layer for li in m.importance.layers] == list(range(m.start, m.end))
        assert m.importance.layers == cal.importance.layers[m.start : m.end]
        assert m.importance.text_sha256 == cal.importance.text_sha256
        on_disk = read_manifest(tmp_path / "pack" / m.name)
        assert on_disk == m  # written and read back unchanged
        assert parse_manifest(json.loads(json.dumps(m.to_json()))) == m  # as the coordinator sends it


def test_manifests_without_importance_still_load_and_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifests = pack_model(tiny_model_dir, tmp_path / "pack", 2, model_id="tiny-llama", progress=False)
    for m in manifests:
        raw = json.loads((tmp_path / "pack" / m.name / MANIFEST).read_text(encoding="utf-8"))
        assert "importance" not in raw and m.importance is None
        assert parse_manifest(raw) == m and m.to_json() == raw


def test_malformed_importance_in_a_manifest_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / CALIBRATION_FILE
    write_calibration(path, tiny_calibration(tiny_model_dir))
    manifests = pack_model(
        tiny_model_dir, tmp_path / "pack", 3, model_id="tiny-llama", progress=False, calibration=path
    )
    raw = manifests[1].to_json()
    wrong_layers = {**raw, "importance": {**raw["importance"], "layers": raw["importance"]["layers"][:1]}}
    nan_score = json.loads(json.dumps(raw))
    nan_score["importance"]["layers"][0]["bi"] = float("nan")
    for bad in (wrong_layers, nan_score, {**raw, "importance": "high"}):
        with pytest.raises(FragmentError, match="malformed"):
            parse_manifest(bad)


def test_pack_picks_up_the_model_folders_calibration_and_refuses_another_models(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    cal = tiny_calibration(folder)
    write_calibration(folder / CALIBRATION_FILE, cal)
    manifests = pack_model(folder, tmp_path / "pack", 2, model_id="tiny-llama", progress=False)
    assert all(m.importance is not None for m in manifests)
    other = Calibration("other", 6, "f" * 64, 24, cal.importance)  # same depth, another config.json
    write_calibration(folder / CALIBRATION_FILE, other)
    with pytest.raises(ConfigError, match="another model"):
        pack_model(folder, tmp_path / "pack2", 2, model_id="tiny-llama", progress=False)
    (folder / CALIBRATION_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read calibration"):
        pack_model(folder, tmp_path / "pack3", 2, model_id="tiny-llama", progress=False)


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize("case", ["missing", "empty", "directory"])
def test_calibrate_bad_text_is_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    if case == "empty":
        text.write_text("  \n", encoding="utf-8")
    elif case == "directory":
        text.mkdir()
    assert main(["calibrate", "smollm2-135m", "--text", str(text), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kluster: error: --text")


def test_calibrate_unknown_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("Some text.", encoding="utf-8")
    assert main(["calibrate", str(tmp_path / "nope"), "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model" in err[0]


def test_bench_sparsity_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("word " * 50, encoding="utf-8")
    cases = [
        ["--text", str(tmp_path / "missing.txt")],
        ["--text", str(text), "--budgets", "1,x"],
        ["--text", str(text), "--budgets", "1.2"],
        ["--text", str(text), "--modes", "layer,heads"],
        ["--text", str(text), "--calibration-fraction", "1"],
    ]
    for extra in cases:
        assert main(["bench", "sparsity", *extra]) == 2, extra
        assert capsys.readouterr().err.startswith("kluster: error: ")


PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. "
)


@pytest.mark.slow  # the real model: ~10 s on an idle 2-core machine
def test_calibrate_then_pack_the_real_model(
    smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(PASSAGE * 3, encoding="utf-8")
    # --out: the session's model folder is shared with other tests and must not gain a calibration
    in_model = smollm2_dir / CALIBRATION_FILE
    before = in_model.read_bytes() if in_model.is_file() else None
    args = ["calibrate", "smollm2-135m", "--text", str(text), "--out", str(tmp_path), "--tokens", "128"]
    assert main([*args, "--loss-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "block influence of 30 layers over 128 tokens, drop-one losses over 24" in out
    cal = read_calibration(tmp_path / CALIBRATION_FILE)
    assert cal.num_layers == 30 and cal.importance.tokens == 128
    assert (in_model.read_bytes() if in_model.is_file() else None) == before  # --out left the model folder alone
    losses = [li.loss for li in cal.importance.layers]
    assert all(loss is not None and math.isfinite(loss) for loss in losses)
    assert losses[0] > 1.0  # without layer 0 the model is lost: one reason it is never skipped
    bi = [li.bi for li in cal.importance.layers]
    # the first layer rewrites the embeddings; the middle layers barely turn the stream
    assert bi[0] > 0.5 and max(bi[1:-1]) < bi[0] and sorted(bi)[len(bi) // 2] < 0.2
    pack = tmp_path / "pack"
    cmd = ["fragments", "pack", "smollm2-135m", "--fragments", "3", "--out", str(pack)]
    assert main([*cmd, "--calibration", str(tmp_path / CALIBRATION_FILE)]) == 0
    assert capsys.readouterr().out.count(", importance") == 3
    m = read_manifest(pack / "frag-01-of-03")
    assert m.importance is not None and m.importance.layers == cal.importance.layers[10:20]


@pytest.mark.slow  # the real model: ~15 s on an idle 2-core machine
def test_bench_sparsity_on_the_real_model(
    smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A few hundred tokens, two budgets: the dense row is the model's own perplexity, skipping costs."""
    from engine.models.tokenizer import ModelTokenizer
    from engine.sparsity.evaluate import split_text
    from engine.transport.codec_eval import text_windows

    text = tmp_path / "text.txt"
    text.write_text(PASSAGE * 6, encoding="utf-8")
    args = ["bench", "sparsity", "--text", str(text), "--calibration-tokens", "192", "--ppl-tokens", "192"]
    args += ["--budgets", "1,0.9", "--modes", "layer,neurons", "--loss-tokens", "16", "--decode-tokens", "4", "--json"]
    args += ["--lossless", "none"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["mode"], r["ranking"], r["activation"]): r for r in result["budgets"]}
    assert list(rows) == [
        ("layer", "bi", 1.0),
        ("layer", "bi", 0.9),
        ("layer", "loss", 1.0),
        ("layer", "loss", 0.9),
        ("neurons", None, 1.0),
        ("neurons", None, 0.9),
    ]
    assert result["lossless"] is None and result["eval_tokens"] == 192
    assert result["calibration"]["tokens"] == 192 and result["calibration"]["loss_tokens"] == 16
    # the dense perplexity is the unmodified model's on the same unseen tokens
    tok = ModelTokenizer(smollm2_dir)
    _, unseen = split_text(PASSAGE * 6, 0.5)
    windows = text_windows(tok.encode(unseen[: 192 * 16], special=False), 193, 192)
    model = load_model(smollm2_dir)
    nll = sum(
        float(
            F.cross_entropy(
                model(torch.tensor([w]), 0, None, all_logits=True)[0, :-1], torch.tensor(w[1:]), reduction="sum"
            )
        )
        for w in windows
    )
    dense_ppl = math.exp(nll / sum(len(w) - 1 for w in windows))
    for key in (("layer", "bi", 1.0), ("layer", "loss", 1.0), ("neurons", None, 1.0)):
        r = rows[key]
        assert r["ppl"] == pytest.approx(dense_ppl, rel=1e-4) and r["ppl_increase"] == 0 and r["compute_saved"] == 0
        assert r["hops"] == 15 and r["hops_by_fragments"]["3"] == 3 and r["tok_s"] > 0

    for ranking in ("bi", "loss"):
        skipped = rows[("layer", ranking, 0.9)]
        assert skipped["ppl_increase"] > 0 and skipped["ppl"] > dense_ppl
        layers = skipped["skipped"]["layers"]
        assert len(layers) == 3 and 0 not in layers and 29 not in layers
        assert skipped["compute_saved"] == pytest.approx(len(layers) / 30, abs=1e-4)
        assert skipped["hops_by_fragments"]["30"] == 27
        assert skipped["flops_per_token"] < rows[("layer", ranking, 1.0)]["flops_per_token"]
    # the bi ranking skips the layers of lowest block influence, as the calibration reported them
    bi = {e["layer"]: e["bi"] for e in result["calibration"]["importance"]}
    chosen = rows[("layer", "bi", 0.9)]["skipped"]["layers"]
    assert max(bi[i] for i in chosen) <= min(bi[i] for i in range(1, 29) if i not in chosen)
    sparse = rows[("neurons", None, 0.9)]
    assert sparse["compute_saved"] == pytest.approx(0.1, abs=0.002) and sparse["ppl_increase"] > 0
    assert sparse["skipped"]["neuron_layers"] == 28 and 0 < sparse["skipped"]["neuron_keep"] < 1
    assert result["default"]["ppl_increase"] <= 0.1
