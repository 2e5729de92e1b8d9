"""Spot-check verification parts: the judge (pure), sketches, the node's trail, the reference, forfeits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.audit.calibrate import Measured, emulate_route, measure
from engine.audit.judge import View, blame, view
from engine.audit.reference import Tolerance, compute_reference
from engine.audit.sketch import MAX_AUDIT_POSITIONS, SKETCH_DIM, decode_rows, encode_rows, node_key, projection
from engine.audit.trail import AuditTrail
from engine.client.receipts import Countersigner
from engine.client.remote import RemotePipeline
from engine.client.spotcheck import MAX_REWINDS, SpotChecker, SpotStats
from engine.coordinator.billing import Billing, Hop
from engine.coordinator.verifier import _parse_reply, claimed_sampling, parse_sampling, repeat_offenders
from engine.errors import ProtocolError
from engine.ledger.chain import Kind
from engine.ledger.credit import Reject
from engine.ledger.pricing import Pricing
from engine.ledger.store import Ledger
from engine.models.loading import load_model
from engine.models.sampling import SamplingParams, sample, sampling_noise
from engine.node.receipts import ReceiptKeeper
from engine.transport.identity import Identity

CLEAN = View()


def off(p: int) -> View:
    """A view clearly wrong from position ``p`` (beyond both thresholds there)."""
    return View(p, p)


# -- the judge -------------------------------------------------------------------------------------


def test_nothing_deviating_passes() -> None:
    found = blame(3, [CLEAN, CLEAN], [CLEAN, CLEAN], None)
    assert not found.failed and found.guilty == () and found.rewind_to is None


@pytest.mark.parametrize("culprit", [0, 1])
def test_a_hop_sending_wrong_states_is_guilty_and_its_successors_are_not(culprit: int) -> None:
    received = [CLEAN, CLEAN]
    sent = [CLEAN, CLEAN]
    received[culprit], sent[culprit] = off(5), off(5)
    if culprit == 0:  # what hop 1 then computes is off from 5 on, and so are the tokens after
        received[1], sent[1] = off(5), off(5)
    found = blame(3, received, sent, token_dev=7)
    assert found.guilty == (culprit,) and found.disputes == ()
    assert found.rewind_to == 6  # the first token computed from the wrong state


def test_a_last_hop_returning_wrong_tokens_is_guilty() -> None:
    found = blame(3, [CLEAN, CLEAN], [CLEAN, CLEAN], token_dev=40)
    assert found.guilty == (2,) and found.rewind_to == 40


def test_a_one_hop_route_with_a_wrong_token_blames_its_hop() -> None:
    assert blame(1, [], [], token_dev=12).guilty == (0,)


def test_sender_and_receiver_contradicting_each_other_is_a_dispute_not_a_ban() -> None:
    # the sender says it sent the right thing, the receiver says it got something else: one lies
    found = blame(3, [off(3), off(3)], [CLEAN, off(3)], token_dev=None)
    assert found.guilty == () and found.disputes == ((0, 1),) and found.rewind_to == 4


def test_an_honest_hop_amplifying_a_small_error_it_was_fed_is_not_blamed() -> None:
    # hop 0 sends states off by a little (beyond honest noise, below the tolerance); hop 1 makes
    # that clearly wrong: hop 1's input showed the deviation first, so hop 1 is no culprit
    small = View(None, 2)
    found = blame(3, [small, off(4)], [small, off(4)], token_dev=None)
    assert 1 not in found.guilty and found.failed


def test_tokens_told_differently_to_client_and_first_hop_is_a_dispute() -> None:
    found = blame(3, [CLEAN, CLEAN], [CLEAN, CLEAN], None, tokens_disagree_at=20)
    assert found.guilty == () and (0, 2) in found.disputes and found.rewind_to == 20
    assert found.links == ()  # not about a link: a lying client must not count against nodes


def test_a_node_contradicting_three_different_partners_is_the_liar() -> None:
    partners = {"liar": {"a", "b"}, "a": {"liar"}, "b": {"liar"}}
    assert repeat_offenders(partners) == []
    partners["liar"].add("c")
    partners["c"] = {"liar"}
    assert repeat_offenders(partners) == ["liar"]  # its honest partners each have one dispute only


def test_spot_checker_avoids_culprits_and_hops_that_cannot_show_their_trail() -> None:
    avoided: list[str] = []
    verdicts = iter(
        [
            {"status": "unavailable", "silent": [{"peer_id": "n-quiet", "name": "quiet", "why": "no trail"}]},
            {"status": "fail", "guilty": [{"peer_id": "n-bad", "name": "bad"}], "disputed": [], "rewind_to": 9},
            {"status": "pass", "positions": 20},
        ]
    )

    async def run() -> SpotStats:
        async def post(body: dict) -> dict:
            return next(verdicts)

        checker = SpotChecker(1.0, post, avoided.append)
        for session in ("a", "b", "c"):
            checker.maybe_check(session, {"prompt_tokens": 5})
            await checker.settle(session)
        assert checker.pending_rewind("b") == 9 and checker.pending_rewind("b") is None
        assert checker.take_events("b")[0]["guilty"] == ["bad"]
        return checker.stats

    stats = asyncio.run(run())
    assert avoided == ["n-quiet", "n-bad"]
    assert (stats.unavailable, stats.failed, stats.passed, stats.steps_verified) == (1, 1, 1, 15)


def test_a_spent_check_budget_makes_the_check_busy_not_an_error() -> None:
    """The coordinator answers 429 once an account's spot-check budget is spent (a real HTTP server here)."""

    async def run() -> dict[str, Any]:
        async def audit(_: web.Request) -> web.Response:
            body = {"error": {"code": "rate_limited", "message": "spot checks of account 'dev' are over"}}
            return web.json_response(body, status=429, headers={"Retry-After": "2"})

        app = web.Application()
        app.router.add_post("/v1/audit", audit)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            return await RemotePipeline(f"http://127.0.0.1:{port}", "m")._post_audit({"job": "j"})
        finally:
            await runner.cleanup()

    assert asyncio.run(run()) == {"status": "busy"}


def test_spot_checker_stops_regenerating_after_max_rewinds() -> None:
    async def run() -> SpotStats:
        async def post(body: dict) -> dict:
            return {"status": "fail", "guilty": [], "disputed": [], "rewind_to": 40}

        checker = SpotChecker(1.0, post, lambda _peer: None)
        for _ in range(MAX_REWINDS + 2):
            checker.maybe_check("s", {"prompt_tokens": 30})
            await checker.settle("s")
            assert checker.pending_rewind("s") in (40, None)
        return checker.stats

    stats = asyncio.run(run())
    assert stats.failed == MAX_REWINDS + 2 and stats.unresolved == 2


@st.composite
def _one_culprit(draw: st.DrawFn) -> tuple[int, int, list[View], list[View], int | None]:
    """A route where one hop perturbs from position p, and honest hops behave as the judge assumes:
    an honest hop's output goes clearly wrong (``high``) no earlier than its input showed any
    deviation beyond honest noise (``low``); below that, anything (it may amplify sub-threshold error)."""
    hops = draw(st.integers(1, 5))
    culprit = draw(st.integers(0, hops - 1))
    p = draw(st.integers(0, 60))
    received, sent = [CLEAN] * (hops - 1), [CLEAN] * (hops - 1)
    upstream_low: int | None = p
    for b in range(culprit, hops - 1):  # the culprit's own boundary and every one after it
        if upstream_low is None:  # its input never deviated: an honest hop's output does not either
            break
        if b == culprit:
            received[b] = View(p, p)
        else:
            low = draw(st.one_of(st.none(), st.integers(p, p + 20)))
            floor = max(upstream_low, low if low is not None else upstream_low)
            high = draw(st.one_of(st.none(), st.integers(floor, floor + 20)))
            received[b] = View(high, low if low is not None or high is None else high)
        # an honest sender's own view sees what it sends: off from p on, as its receiver's is
        sent[b] = View(draw(st.one_of(st.none(), st.integers(p, p + 20))), draw(st.integers(p, p + 20)))
        upstream_low = received[b].low
    if culprit == hops - 1:
        token = p + 1
    elif upstream_low is None:
        token = None
    else:
        token = draw(st.one_of(st.none(), st.integers(upstream_low + 1, upstream_low + 30)))
    return hops, culprit, received, sent, token


@settings(max_examples=300, deadline=None)
@given(_one_culprit())
def test_property_only_the_perturbing_hop_is_ever_found_guilty(case: tuple) -> None:
    hops, culprit, received, sent, token = case
    found = blame(hops, received, sent, token)
    assert found.failed
    assert set(found.guilty) <= {culprit}
    for a, b in found.disputes:  # a dispute always involves the culprit's link
        assert culprit in (a, b)
    assert found.rewind_to is not None and found.rewind_to <= (token if token is not None else 10**9)


def test_view_finds_first_positions() -> None:
    assert view([0.01, 0.2, 0.5, 0.1], 0.3, 0.15) == View(2, 1)
    assert view([0.01] * 4, 0.3, 0.15) == View(None, None)


# -- sketches and the node's trail ------------------------------------------------------------------


def test_sketch_rows_round_trip_and_refuse_malformed_input() -> None:
    rows = torch.randn(5, SKETCH_DIM)
    assert torch.equal(decode_rows(encode_rows(rows), 5), rows)
    with pytest.raises(ProtocolError):
        decode_rows(encode_rows(rows), 4)
    with pytest.raises(ProtocolError):
        decode_rows("not base64!", 1)
    with pytest.raises(ProtocolError):
        decode_rows(encode_rows(torch.full((1, SKETCH_DIM), float("nan"))), 1)
    with pytest.raises(ProtocolError):
        decode_rows(12, 1)


def test_projection_keys_are_per_node_and_deterministic() -> None:
    secret = b"s" * 32
    a, b = node_key(secret, "n-a"), node_key(secret, "n-b")
    assert a != b and node_key(secret, "n-a") == a
    assert torch.equal(projection(a, "sent", 16), projection(a, "sent", 16))
    assert not torch.equal(projection(a, "sent", 16), projection(a, "received", 16))


def test_trail_reports_what_was_recorded_and_follows_rewinds() -> None:
    trail = AuditTrail()
    trail.record("s", 0, torch.randn(4, 8), torch.randn(4, 8), "fp32")  # no key yet: nothing kept
    assert "missing" in trail.report("s", 4)
    trail.set_key(b"k" * 32)
    first = torch.randn(4, 8)
    trail.record("s", 0, first, first * 2, "fp32")
    trail.record("s", 4, torch.randn(1, 8), torch.randn(1, 8), "fp32")
    body = trail.report("s", 5)
    assert body["positions"] == 5 and "tokens" not in body
    got = decode_rows(body["received"], 5)
    assert torch.allclose(got[:4], first @ projection(b"k" * 32, "received", 8))
    trail.record("s", 2, torch.randn(1, 8), torch.randn(1, 8), "fp32")  # a rewind to position 2
    assert trail.report("s", 3)["positions"] == 3 and "missing" in trail.report("s", 4)
    assert "missing" in trail.report("other", 1)


def test_first_hop_trail_keeps_token_ids_and_last_hop_keeps_no_sent_view() -> None:
    trail = AuditTrail()
    trail.set_key(b"k" * 32)
    trail.record("s", 0, torch.tensor([5, 6, 7]), None, "int8")
    body = trail.report("s", 3)
    assert body["tokens"] == [5, 6, 7] and body["codec"] == "int8" and "sent" not in body


def test_last_hop_trail_says_how_it_was_asked_to_pick_tokens() -> None:
    trail = AuditTrail()
    trail.set_key(b"k" * 32)
    asked = SamplingParams(0.7, 1.0, 42)
    trail.record("s", 0, torch.randn(3, 8), None, "fp32", asked)
    trail.record("s", 3, torch.randn(1, 8), None, "fp32", asked)
    assert parse_sampling(trail.report("s", 4)["sampling"]) == asked
    trail.record("s", 4, torch.randn(1, 8), None, "fp32", SamplingParams(0.7, 1.0, 43))  # the client changed seed
    assert trail.report("s", 5)["sampling"] == "mixed" and parse_sampling("mixed") is None  # tokens go unchecked


def test_audit_uses_the_sampling_both_client_and_last_hop_name() -> None:
    hidden = torch.randn(2, SKETCH_DIM)
    reply = {"positions": 2, "codec": "fp32", "received": encode_rows(hidden)}
    sampled = {"temperature": 0.7, "top_p": 1.0, "seed": 5}
    got = _parse_reply({**reply, "sampling": sampled}, 2, 1, 2, "fp32", SamplingParams(0.7, 1.0, 5))
    assert got.sampling == SamplingParams(0.7, 1.0, 5)
    # a client calling a sampled job greedy (to get the honest last hop banned) gets no verdict on it
    with pytest.raises(ProtocolError, match="the client says"):
        _parse_reply({**reply, "sampling": sampled}, 2, 1, 2, "fp32", SamplingParams())
    with pytest.raises(ProtocolError, match="the client says"):  # nor a last hop naming another seed
        _parse_reply({**reply, "sampling": {**sampled, "seed": 6}}, 2, 1, 2, "fp32", SamplingParams(0.7, 1.0, 5))
    for unsaid in ({}, {"sampling": "mixed"}):  # a last hop cannot keep its tokens unchecked by not saying
        with pytest.raises(ProtocolError, match="does not say"):
            _parse_reply({**reply, **unsaid}, 2, 1, 2, "fp32", SamplingParams(0.7, 1.0, 5))
    assert _parse_reply(reply, 2, 1, 2, "fp32", None).sampling is None  # the client did not say either
    greedy = {"temperature": 0.0, "top_p": 0.9, "seed": 1}  # greedy ignores top-p and seed
    assert _parse_reply({**reply, "sampling": greedy}, 2, 1, 2, "fp32", SamplingParams()).sampling is not None
    assert claimed_sampling({"greedy": True}) == SamplingParams() and claimed_sampling({"greedy": False}) is None
    assert claimed_sampling({"sampling": sampled}) == SamplingParams(0.7, 1.0, 5)
    for bad in ("x", {"temperature": -1, "top_p": 1.0, "seed": 0}, {**sampled, "seed": 1.5}, {**sampled, "x": 1}):
        assert parse_sampling(bad) is None


@given(st.integers(0, 2**62), st.integers(0, 4096), st.sampled_from([0.2, 0.7, 1.0, 1.8]))
@settings(max_examples=30, deadline=None)
def test_sampled_token_wins_the_seeded_exponential_race(seed: int, position: int, temperature: float) -> None:
    """What the verifier relies on: the sampler's choice is the race ``argmax(l/T - log E)``."""
    logits = torch.randn(300, generator=torch.Generator().manual_seed(seed % 1000)) * 4
    params = SamplingParams(temperature, 1.0, seed)
    scores = logits.double() / temperature - sampling_noise(seed, position, 300).double().log()
    assert sample(logits, params, position) == int(scores.argmax())
    assert sample(logits, params, position) == sample(logits.clone(), params, position)


def test_trail_of_a_session_too_long_to_audit_says_so() -> None:
    trail = AuditTrail()
    trail.set_key(b"k" * 32)
    trail.record("s", 0, torch.zeros(MAX_AUDIT_POSITIONS + 1, dtype=torch.int64), None, "fp32")
    assert "outgrew" in trail.report("s", 1)["missing"]


# -- the reference against an emulated route (the tiny model) -----------------------------------------


def test_reference_matches_an_honest_route_and_catches_a_perturbing_hop(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    layers = model.cfg.num_hidden_layers
    hops = [(0, 2), (2, 4), (4, layers)]
    prompt = [3, 14, 15, 92, 65, 35]
    honest = measure(model, emulate_route(model, prompt, hops, 12), hops, Tolerance())
    assert honest.max_error < 1e-4 and honest.guilty == () and honest.rewind_to is None
    for codec in ("int8", "bf16"):
        run = emulate_route(model, prompt, hops, 12, codec=codec)
        assert measure(model, run, hops, Tolerance(), codec=codec).rewind_to is None
    for hop in (0, 1):
        bad = measure(model, emulate_route(model, prompt, hops, 12, perturb=1.0, perturb_hop=hop), hops, Tolerance())
        assert bad.guilty == (hop,) and bad.rewind_to is not None and bad.rewind_to <= len(prompt)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_reference_checks_sampled_tokens_and_catches_a_lying_last_hop(tiny_model_dir: Path, temperature: float) -> None:
    model = load_model(tiny_model_dir)
    hops = [(0, 2), (2, model.cfg.num_hidden_layers)]
    prompt = [3, 14, 15, 92, 65, 35]
    sampling = SamplingParams(temperature, 1.0, 1234)
    tol = Tolerance(logit_gap=0.5)  # the tiny random model's logits span ~1, SmolLM2's ~30

    def run(lie_at: int | None) -> Measured:
        route = emulate_route(model, prompt, hops, 16, sampling=sampling, lie_at=lie_at)
        return measure(model, route, hops, tol, sampling=sampling)

    honest = run(None)
    assert honest.max_gap < 1e-3 and honest.rewind_to is None
    lie = run(5)
    # the lie is the 6th generated token: the last hop is blamed from the position that fed it
    assert lie.max_gap > tol.logit_gap and lie.guilty == (1,) and lie.rewind_to == len(prompt) + 5


def test_reference_skips_layers_and_refuses_routes_that_do_not_cover_the_model(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    layers = model.cfg.num_hidden_layers
    ref = compute_reference(model, [1, 2, 3], [(0, 2), (3, layers)], skip=frozenset({2}))
    assert len(ref.sent) == 1 and ref.greedy.shape == (3,)
    with pytest.raises(ValueError):
        compute_reference(model, [1, 2, 3], [(0, 2), (3, layers)])


# -- forfeits ---------------------------------------------------------------------------------------------


def _credited(billing: Billing, node: Identity, client: Identity, job: str, tokens: int) -> None:
    keeper = ReceiptKeeper(node, node.peer_id("n"), every=1)
    signer = Countersigner(client)
    signer.job_started(job, "m", {node.peer_id("n"): (0, 10)})
    signer.requested(job, tokens)
    signed = keeper.record(
        job, "s", model="m", fragment_id="f0", layers=(0, 10), tokens=tokens, input_bytes=b"i", output_bytes=b"o"
    )
    countersigned = signer.consider(signed.to_json() if signed else None)
    assert countersigned is not None
    assert asyncio.run(billing.submit(countersigned)).ok


def test_a_banned_supplier_loses_the_job_earnings_and_earns_nothing_more(tmp_path: Path) -> None:
    good, bad, client = Identity.ephemeral(), Identity.ephemeral(), Identity.ephemeral()
    billing = Billing(Ledger(tmp_path / "ledger.sqlite3"), Pricing(default=1_000_000))
    for job in ("job-1", "job-2"):
        for node in (good, bad):
            billing.assign(
                job,
                client=client.peer_id("c"),
                developer="dev",
                model="m",
                model_layers=20,
                hops=[Hop(node.peer_id("n"), "f0", (0, 10))],
            )
            _credited(billing, node, client, job, 8)
    bad_id, good_id = bad.peer_id("n"), good.peer_id("n")
    before = billing.ledger.spend("dev").total.amount
    taken = asyncio.run(billing.forfeit("job-1", bad_id))
    assert taken > 0
    assert billing.ledger.earnings(bad_id).per_job["job-1"].amount == 0
    assert billing.ledger.earnings(bad_id).per_job["job-2"].amount > 0  # other jobs: not judged here
    assert billing.ledger.earnings(good_id).per_job["job-1"].amount > 0
    assert billing.ledger.spend("dev").total.amount == before - taken  # the developer is refunded
    assert asyncio.run(billing.forfeit("job-1", bad_id)) == 0  # nothing more to take
    assert billing.ledger.verify().ok
    assert {Kind(r.kind) for r in billing.ledger.rows()} >= {Kind.CLAWBACK, Kind.REFUND}
    # later receipts of the banned supplier earn nothing, whatever the job
    keeper = ReceiptKeeper(bad, bad_id, every=1)
    signer = Countersigner(client)
    signer.job_started("job-2", "m", {bad_id: (0, 10)})
    signer.requested("job-2", 100)
    keeper.record(
        "job-2", "s", model="m", fragment_id="f0", layers=(0, 10), tokens=8, input_bytes=b"", output_bytes=b""
    )
    late = keeper.record(
        "job-2", "s", model="m", fragment_id="f0", layers=(0, 10), tokens=1, input_bytes=b"", output_bytes=b""
    )
    countersigned = signer.consider(late.to_json() if late else None)
    assert countersigned is not None
    assert asyncio.run(billing.submit(countersigned)).reject is Reject.BANNED
    billing.close()


def test_billing_forgets_the_oldest_jobs_past_its_bound(tmp_path: Path) -> None:
    node, client = Identity.ephemeral(), Identity.ephemeral()
    billing = Billing(Ledger(tmp_path / "ledger.sqlite3"), Pricing(default=1_000_000))
    billing.max_jobs = 2
    for job in ("job-1", "job-2", "job-3"):
        billing.assign(
            job,
            client=client.peer_id("c"),
            developer="d",
            model="m",
            model_layers=20,
            hops=[Hop(node.peer_id("n"), "f0", (0, 10))],
        )
    assert billing.client_of("job-1", node.peer_id("n")) is None  # forgotten: its receipts earn nothing
    assert billing.client_of("job-3", node.peer_id("n")) == client.peer_id("c")
    _credited(billing, node, client, "job-2", 4)
    billing.close()
