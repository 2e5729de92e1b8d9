"""The lossless row of ``kluster bench sparsity``: verified drafts against dense decoding, same route.

Why a real route: the point of drafting locally is that a drafted token costs no network hop,
so the speed-up only shows where hops cost time. Each condition runs the same prompts twice
through the same coordinator and nodes, dense (``kluster generate``) and with
``--activation A --verify``; the figures are the identical-output count, the full-route passes
per generated token, the draft acceptance rate, and the wall-time speed-up (dense total time /
verified total time, summed over the prompts, so both sides generate the same tokens).

On loopback the nodes share this machine's cores with the client's draft, and a hop costs ~0.3
ms, so little is saved there; under the WAN harness (``engine.wanemu``, root only) every hop
costs its one-way delay, as on the internet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.errors import KlusterError
from engine.launcher import kluster_command

log = logging.getLogger(__name__)

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a GPU is in one paragraph.",
    "List three fruits and their colours.",
    "How do I reverse a list in Python?",
)


def compare(dense: Sequence[dict[str, Any]], verified: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Figures from the ``done`` events of the same prompts, dense and verified (pure)."""
    identical = sum(d["token_ids"] == v["token_ids"] for d, v in zip(dense, verified, strict=True))
    rounds = sum(v["stats"]["speculative"]["rounds"] for v in verified)
    emitted = sum(len(v["token_ids"]) for v in verified)
    figures = [v["stats"]["speculative"] for v in verified]
    rates = [s["acceptance_rate"] for s in figures if s["acceptance_rate"] is not None]
    dense_s = sum(d["stats"]["total_s"] for d in dense)
    verified_s = sum(v["stats"]["total_s"] for v in verified)
    return {
        "prompts": len(dense),
        "identical": identical,
        "passes_per_token": round(rounds / emitted, 4) if emitted else None,
        "acceptance_rate": round(sum(rates) / len(rates), 4) if rates else None,
        "dense_s": round(dense_s, 3),
        "verified_s": round(verified_s, 3),
        "speedup": round(dense_s / verified_s, 3) if verified_s else None,
        "skipped_layers": verified[0]["stats"]["speculative"]["skipped_layers"] if verified else [],
        # where a verified round's time goes: drafting here, and the route's verification
        "draft_ms_per_round": round(sum(s["draft_ms"] for s in figures) / rounds, 1) if rounds else None,
        "verify_ms_per_round": round(sum(s["verify_ms"] for s in figures) / rounds, 1) if rounds else None,
        "dense_ms_per_token": round(
            sum(d["stats"]["total_s"] for d in dense) * 1000 / max(1, sum(len(d["token_ids"]) for d in dense)), 1
        ),
    }


def _done(lines: str) -> dict[str, Any]:
    events = [json.loads(line) for line in lines.splitlines() if line.strip()]
    done = next((e for e in events if e.get("event") == "done"), None)
    if done is None:
        raise KlusterError("a generation ended without its done event")
    return done


def run_pairs(
    generate: Callable[[str, tuple[str, ...]], dict[str, Any]],
    prompts: Sequence[str],
    verify_args: tuple[str, ...],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Dense then verified for each prompt (interleaved, so load drifts hit both alike)."""
    generate(prompts[0], ())  # warm-up: links open, the draft model is fetched and cached
    generate(prompts[0], verify_args)
    dense, verified = [], []
    for i, prompt in enumerate(prompts):
        progress(f"prompt {i + 1}/{len(prompts)}: dense, then {' '.join(verify_args)}")
        dense.append(generate(prompt, ()))
        verified.append(generate(prompt, verify_args))
    return compare(dense, verified)


def loopback(
    pack: Path, verify_args: tuple[str, ...], tokens: int, prompts: Sequence[str], progress: Callable[[str], None]
) -> dict[str, Any]:
    """3 node processes on loopback, the client a ``kluster generate`` process like a user's."""
    from engine.launcher import LocalCluster

    with tempfile.TemporaryDirectory(prefix="kluster-lossless-") as tmp:
        cluster = LocalCluster(pack, 3, cache_dir=Path(tmp) / "cache", log_dir=Path(tmp) / "logs")
        cluster.start()
        try:
            asyncio.run(cluster.wait_for_route(_model_id(pack), timeout_s=300))

            def generate(prompt: str, extra: tuple[str, ...]) -> dict[str, Any]:
                cmd = kluster_command(
                    "generate", "--coordinator", cluster.url, "--prompt", prompt, "--chat",
                    "--max-new-tokens", str(tokens), "--json", *extra,
                )  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
                if res.returncode != 0:
                    raise KlusterError(f"kluster generate failed: {res.stderr.strip().splitlines()[-1:]}")
                return _done(res.stdout)

            return run_pairs(generate, prompts, verify_args, progress)
        finally:
            cluster.stop()


def wan(
    pack: Path,
    verify_args: tuple[str, ...],
    tokens: int,
    prompts: Sequence[str],
    delay_ms: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The same under the WAN harness: every host's traffic delayed ``delay_ms`` one way (root only)."""
    from engine.wan_cluster import WanCluster

    with tempfile.TemporaryDirectory(prefix="kluster-lossless-wan-") as tmp:
        progress(f"starting a coordinator, a client and 3 nodes on emulated hosts, {delay_ms:g} ms one way ...")
        with WanCluster(pack, 3, Path(tmp), model_id=_model_id(pack), seed=1) as grid:
            for host in ("coord", "client", "n1", "n2", "n3"):
                grid.topo.set_link(host, delay_ms=delay_ms, loss=0.0)

            def generate(prompt: str, extra: tuple[str, ...]) -> dict[str, Any]:
                events = grid.generate(prompt, tokens, extra=extra, timeout_s=900)
                return next(e for e in events if e["event"] == "done")

            return run_pairs(generate, prompts, verify_args, progress)


def _model_id(pack: Path) -> str:
    from engine.fragments.store import read_pack

    return read_pack(pack).model_id
