"""``kluster generate``: one prompt, locally or through a coordinator's route, streamed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from engine import aio, paths
from engine.client.generation import GenerationRequest, Pipeline, generate_events
from engine.errors import ConfigError
from engine.models.config import ModelConfig
from engine.models.sampling import SamplingParams
from engine.models.tokenizer import ModelTokenizer

if TYPE_CHECKING:
    from engine.coordinator.auth import SessionAuth


def register(sub: Any) -> None:
    from engine.cli import add_generation_options

    p = sub.add_parser("generate", help="generate text with a model, on the grid or locally")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--coordinator", help="coordinator URL, e.g. http://127.0.0.1:8765")
    where.add_argument("--local", action="store_true", help="run the whole model in this process (reference path)")
    p.add_argument("--model", default="smollm2-135m", help="model id, local folder or hub id (default smollm2-135m)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for --local")
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="file whose first line is your developer account token (default: $KLUSTER_TOKEN; "
        "none: for coordinators with auth off)",
    )
    add_generation_options(p, prompt_required=True)
    p.set_defaults(handler=run)


def request_from_args(args: argparse.Namespace, tokenizer: ModelTokenizer) -> GenerationRequest:
    if not 1 <= args.max_new_tokens <= 100_000:
        raise ConfigError(f"--max-new-tokens must be between 1 and 100000, got {args.max_new_tokens}")
    if args.seed < 0:
        raise ConfigError("--seed must be non-negative")
    text = args.prompt
    if not text:
        raise ConfigError("--prompt must not be empty")
    if args.chat:
        text = tokenizer.render_chat([{"role": "user", "content": args.prompt}])
    return GenerationRequest(
        prompt_ids=tokenizer.encode(text),
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(args.temperature, args.top_p, args.seed),
        stop_ids=tokenizer.stop_ids,
    )


def _print_summary(done: dict[str, Any], names: dict[str, str], out: TextIO) -> None:
    s = done["stats"]
    rate = f"{s['decode_tok_s']:.1f} tok/s" if s["decode_tok_s"] else "n/a"
    net = (
        f", network+overhead {s['network_ms_per_token']:.2f} ms/token" if s["network_ms_per_token"] is not None else ""
    )
    print(
        f"\n[{s['generated_tokens']} tokens, prompt {s['prompt_tokens']} tokens, prefill {s['prefill_ms']:.0f} ms, "
        f"decode {rate}{net}]",
        file=out,
    )
    for hop in s["hops"]:
        name = names.get(hop["peer"], hop["peer"])
        print(f"  {name:<12} compute {hop['compute_ms']:7.2f} ms/token   queue {hop['queue_ms']:6.2f} ms", file=out)
    budget = s.get("activation")
    if budget:
        hops = f", {budget['hops']} hops" if "hops" in budget else ""
        print(
            f"  activation {budget['activation']:.2f} (asked {budget['requested']:g}): "
            f"{budget['layers_run']} of {budget['layers']} layers run{hops}, skipped {budget['skip']}",
            file=out,
        )
    spot = s.get("spot_checks")
    if spot:
        caught = ", ".join(spot["guilty"] + spot["disputed"])
        partly = spot.get("tokens_checked", spot["passed"]) < spot["passed"]
        print(
            f"  spot checks: {spot['requested']} asked, {spot['passed']} passed, {spot['failed']} failed"
            f"{f' ({caught})' if caught else ''}, {spot['steps_verified']} generated tokens verified"
            f"{' (hidden states only: tokens sampled with top-p < 1 are not checked)' if partly else ''}",
            file=out,
        )
    spec = s.get("speculative")
    if spec:
        print(
            f"  verified drafts: {spec['draft_tokens']} per pass with layers {spec['skipped_layers']} skipped, "
            f"acceptance {spec['acceptance_rate']}, {spec['passes_per_token']} full passes per token",
            file=out,
        )


async def stream(
    pipeline: Pipeline,
    tokenizer: ModelTokenizer,
    request: GenerationRequest,
    *,
    as_json: bool,
    first_events: list[dict[str, Any]] | None = None,
    names: dict[str, str] | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run a generation, printing events (JSON lines) or streamed text; returns the ``done`` event."""
    out = out or sys.stdout  # looked up per call: tests and callers may swap sys.stdout
    for ev in first_events or []:
        if as_json:
            print(json.dumps(ev), file=out, flush=True)
    done: dict[str, Any] = {}
    async for ev in generate_events(pipeline, tokenizer, request):
        if as_json:
            print(json.dumps(ev), file=out, flush=True)
        elif ev["event"] == "token":
            print(ev["text"], end="", file=out, flush=True)
        elif ev["event"] == "spot_check":
            who = ", ".join(ev["guilty"] + ev["disputed"]) or "a node"
            print(f"\n[spot check failed: {who} returned wrong work; avoiding it]", file=out, flush=True)
        elif ev["event"] == "rewind":
            print(f"\n[regenerating from token {ev['to_token']}]\n{ev['text']}", end="", file=out, flush=True)
        if ev["event"] == "done":
            done = ev
    if not as_json:
        _print_summary(done, names or {}, sys.stderr if out is sys.stdout else out)
    return done


def route_text(route_event: dict[str, Any]) -> str:
    parts = []
    for i, n in enumerate(route_event["nodes"]):
        start, end = n["layers"]
        extra = " + embeddings" if i == 0 else ""
        extra += " + head" if i == len(route_event["nodes"]) - 1 else ""
        parts.append(f"{n['name']} [layers {start}-{end - 1}{extra}]")
    return "route: " + " -> ".join(parts)


async def run_remote(args: argparse.Namespace, coordinator: str, *, out: TextIO | None = None) -> dict[str, Any]:
    """Queue a job at the coordinator, and once it is granted a slot, generate through a route."""
    from engine.coordinator.auth import SessionAuth, load_account_token
    from engine.transport.signaling import ws_url

    if not 0 < args.route_wait <= 3600:
        raise ConfigError(f"--route-wait must be between 0 and 3600 seconds, got {args.route_wait:g}")
    ws_url(coordinator)  # a malformed URL is a one-line error before anything is sent
    # Only `generate` has --token-file; the demo (the other caller) runs its own grid with auth off.
    token = load_account_token(args.token_file) if "token_file" in vars(args) else None
    auth = SessionAuth(coordinator, token) if token else None
    try:
        return await _run_job(args, coordinator, auth, out=out)
    finally:
        if auth is not None:
            await auth.close()


async def _run_job(
    args: argparse.Namespace, coordinator: str, auth: SessionAuth | None, *, out: TextIO | None
) -> dict[str, Any]:
    from engine.client.jobs import JobTicket

    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    async with JobTicket(
        coordinator,
        args.model,
        tenant=args.tenant,
        priority=args.priority,
        params=params,
        wait_for_route=args.wait_for_route,
        auth=auth,
    ) as job:

        def queued(view: dict[str, Any]) -> None:
            event = {"event": "job", "id": job.id, "state": "queued", "position": view.get("position")}
            if args.json:
                print(json.dumps(event), file=out or sys.stdout, flush=True)
            else:
                print(f"queued as {job.id}, position {view.get('position')}", file=sys.stderr)

        await job.wait_turn(queued)
        done = await _generate_remote(args, coordinator, auth, out=out)
        job.tokens = int(done.get("stats", {}).get("generated_tokens", 0))
        return done


def check_activation(args: argparse.Namespace) -> None:
    """One-line errors for a budget that cannot work, before anything is loaded or sent."""
    if not 0.0 < args.activation <= 1.0:
        raise ConfigError(f"--activation must be in (0, 1], got {args.activation:g}")
    if args.verify:
        if args.activation >= 1.0:
            raise ConfigError("--verify drafts with a reduced model: give --activation below 1, e.g. 0.8")
        if args.temperature > 0:
            raise ConfigError("--verify supports greedy decoding only (temperature 0) for now")
        if not 1 <= args.draft_tokens <= 32:
            raise ConfigError(f"--draft-tokens must be between 1 and 32, got {args.draft_tokens}")
    spot = getattr(args, "spot_check", 0.0)
    if not 0.0 <= spot <= 1.0:
        raise ConfigError(f"--spot-check must be a fraction of steps in [0, 1], got {spot:g}")


async def _generate_remote(
    args: argparse.Namespace, coordinator: str, auth: SessionAuth | None, *, out: TextIO | None
) -> dict[str, Any]:
    from engine.client.remote import RemotePipeline
    from engine.client.speculative import SpeculativePipeline

    check_activation(args)
    activation = 1.0 if args.verify else args.activation  # verification runs the whole model
    private = tuple(n.strip() for n in getattr(args, "private_nodes", "").split(",") if n.strip())
    pipeline = RemotePipeline(
        coordinator,
        args.model,
        route_wait_s=args.route_wait,
        codec=args.codec,
        activation=activation,
        auth=auth,
        private_nodes=private,
        spot_check=getattr(args, "spot_check", 0.0),
    )
    spec: SpeculativePipeline | None = None
    try:
        await pipeline.start()
        folder = await pipeline.fetch_tokenizer(paths.cache_dir())
        tokenizer = ModelTokenizer(folder)
        request = request_from_args(args, tokenizer)
        if args.verify:
            budget = await pipeline.budget_for(args.activation)
            model = await pipeline.fetch_model(paths.cache_dir())
            spec = SpeculativePipeline(pipeline, model, frozenset(budget["skip"]), args.draft_tokens, budget=budget)
        route = pipeline.route_event()
        if not args.json:
            print(route_text(route), file=sys.stderr)
        names = {h.peer_id: h.name for h in pipeline.route}
        run: Pipeline = spec or pipeline
        return await stream(run, tokenizer, request, as_json=args.json, first_events=[route], names=names, out=out)
    finally:
        if spec is not None:
            await spec.shutdown()
        await pipeline.shutdown()


async def run_local(args: argparse.Namespace, *, out: TextIO | None = None) -> dict[str, Any]:
    import torch

    from engine.client.local import LocalPipeline
    from engine.client.speculative import SpeculativePipeline
    from engine.fragments import torch_thread
    from engine.models.loading import load_model
    from engine.models.resolve import resolve_model

    check_activation(args)
    if getattr(args, "spot_check", 0.0) > 0:
        raise ConfigError("--spot-check needs a grid (--coordinator): a local run has nobody to check")
    if args.threads:
        await torch_thread.run(torch.set_num_threads, args.threads)
    _, folder = resolve_model(args.model)
    tokenizer = ModelTokenizer(folder)
    request = request_from_args(args, tokenizer)
    model = await torch_thread.run(load_model, folder)
    budget = local_budget(folder, model.cfg, args.activation) if args.activation < 1.0 else None
    skip = frozenset(budget["skip"]) if budget else frozenset()
    pipeline = LocalPipeline(model, skip=frozenset() if args.verify else skip, budget=None if args.verify else budget)
    run: Pipeline = pipeline
    if args.verify:
        run = SpeculativePipeline(pipeline, model, skip, args.draft_tokens, budget=budget)
    try:
        return await stream(run, tokenizer, request, as_json=args.json, out=out)
    finally:
        await pipeline.shutdown()


def local_budget(folder: Path, cfg: ModelConfig, activation: float) -> dict[str, Any]:
    """The activation plan from the model folder's own calibration (``kluster calibrate``)."""
    from engine.scheduler import activation as plan
    from engine.sparsity.importance import CALIBRATION_FILE, read_calibration

    importance = read_calibration(folder / CALIBRATION_FILE).importance.layers
    return plan.describe(plan.plan_layers(importance, cfg, activation), cfg, activation)


def run(args: argparse.Namespace) -> int:
    if args.local:
        aio.run(run_local(args))
    else:
        aio.run(run_remote(args, args.coordinator))
    return 0
