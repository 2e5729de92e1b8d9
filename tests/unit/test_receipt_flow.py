"""The node's receipt keeper and the client's countersigner (engine.node.receipts, engine.client.receipts)."""

from __future__ import annotations

import torch

from engine.client.receipts import Countersigner
from engine.ledger.credit import Assignment, CreditBook
from engine.ledger.receipts import countersignature_valid, supplier_signature_valid
from engine.node.receipts import ReceiptKeeper, tensor_bytes
from engine.transport.identity import Identity

LAYERS = (0, 10)


def _keeper(every: int = 4) -> tuple[Identity, ReceiptKeeper]:
    node = Identity.ephemeral()
    return node, ReceiptKeeper(node, node.peer_id("n"), every=every)


def _step(keeper: ReceiptKeeper, tokens: int, job: str = "job-1", session: str = "s1", layers=LAYERS):
    return keeper.record(
        job,
        session,
        model="m",
        fragment_id="frag-0",
        layers=layers,
        tokens=tokens,
        input_bytes=b"in" * tokens,
        output_bytes=b"out" * tokens,
    )


def test_keeper_signs_cumulative_receipts_every_n_tokens_and_on_close() -> None:
    _, keeper = _keeper(every=4)
    first = _step(keeper, 5)  # a prefill of 5 positions: due at once
    assert first is not None and supplier_signature_valid(first)
    r = first.receipt
    assert (r.seq, r.tokens, r.cumulative_units, r.layers) == (1, (0, 5), 50, LAYERS)
    assert [_step(keeper, 1) for _ in range(3)] == [None, None, None]
    second = _step(keeper, 1)
    assert second is not None
    assert (second.receipt.seq, second.receipt.tokens, second.receipt.cumulative_units) == (2, (5, 9), 90)
    assert second.receipt.input_hash != r.input_hash  # rolling over every input so far
    _step(keeper, 1)
    tail = keeper.session_closed("s1")
    assert tail is not None and (tail.receipt.seq, tail.receipt.tokens) == (3, (9, 10))
    assert keeper.session_closed("s1") is None  # nothing left to claim


def test_keeper_counts_a_job_across_sessions_and_refuses_other_layers() -> None:
    _, keeper = _keeper(every=100)
    _step(keeper, 3, session="a")
    _step(keeper, 2, session="b")
    assert _step(keeper, 2, session="b", layers=(0, 5)) is None  # not the job's layers: not counted
    closed = keeper.session_closed("a")
    assert closed is not None and closed.receipt.tokens == (0, 5)
    assert keeper.session_closed("b") is None
    assert _step(keeper, 1, job="") is None  # no job: no receipts


def test_tensor_bytes_covers_any_dtype() -> None:
    assert tensor_bytes(torch.tensor([1, 2], dtype=torch.int64)) == (1).to_bytes(8, "little") + (2).to_bytes(
        8, "little"
    )
    assert len(tensor_bytes(torch.zeros(2, 3, dtype=torch.bfloat16))) == 12


def _client_with_job(node: Identity, requested: int) -> tuple[Identity, Countersigner]:
    client = Identity.ephemeral()
    signer = Countersigner(client)
    signer.job_started("job-1", "m", {node.peer_id("n"): LAYERS})
    signer.requested("job-1", requested)
    return client, signer


def test_client_countersigns_only_what_it_requested() -> None:
    node, keeper = _keeper(every=4)
    signed = _step(keeper, 8)
    assert signed is not None
    client, signer = _client_with_job(node, requested=8)
    ok = signer.consider(signed.to_json())
    assert ok is not None and countersignature_valid(ok) and ok.countersignature is not None
    assert ok.countersignature.client == client.peer_id("c")
    _, stingy = _client_with_job(node, requested=7)
    assert stingy.consider(signed.to_json()) is None  # claims more positions than were asked for
    stranger = Countersigner(Identity.ephemeral())
    assert stranger.consider(signed.to_json()) is None  # not our job
    other_layers = Countersigner(client)
    other_layers.job_started("job-1", "m", {node.peer_id("n"): (0, 5)})
    other_layers.requested("job-1", 100)
    assert other_layers.consider(signed.to_json()) is None
    assert signer.consider("{not json") is None and signer.consider(None) is None


def test_keeper_and_countersigner_feed_the_credit_book() -> None:
    """The pieces together: a replay and a supplier-only receipt earn nothing."""
    node, keeper = _keeper(every=4)
    client, signer = _client_with_job(node, requested=12)
    book = CreditBook()
    book.assign(Assignment("job-1", node.peer_id("n"), client.peer_id("c"), "m", 30, "frag-0", LAYERS, 100))
    receipts = [r for r in (_step(keeper, 4) for _ in range(3)) if r is not None]
    countersigned = [signer.consider(r.to_json()) for r in receipts]
    assert all(c is not None for c in countersigned)
    assert not book.submit(receipts[0]).ok  # supplier-only
    units = [book.submit(c).units for c in countersigned if c is not None]
    assert units == [40, 40, 40]
    assert countersigned[1] is not None and not book.submit(countersigned[1]).ok  # replay
