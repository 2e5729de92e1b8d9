"""Work receipts: canonical bytes, signatures, strict wire parsing, and the crediting decision."""

from __future__ import annotations

import base64
import dataclasses
import json
import string
from typing import Any

import pytest

from engine.ledger.credit import Assignment, CreditBook, Credited, Reject, decide, ledger_entries
from engine.ledger.pricing import Pricing
from engine.ledger.receipts import (
    RECEIPT_CONTEXT,
    Receipt,
    ReceiptError,
    SignedReceipt,
    activation_hash,
    check_route,
    countersign,
    countersignature_valid,
    sign_receipt,
    supplier_signature_valid,
)
from engine.transport.identity import Identity

SUPPLIER = Identity.ephemeral()
CLIENT = Identity.ephemeral()
OTHER = Identity.ephemeral()  # a third party: another node or client
SUPPLIER_ID = SUPPLIER.peer_id("n")
CLIENT_ID = CLIENT.peer_id("c")
H_IN = activation_hash(b"input activations")
H_OUT = activation_hash(b"output activations")

ASSIGNMENT = Assignment(
    job_id="job-1",
    supplier=SUPPLIER_ID,
    client=CLIENT_ID,
    model="smollm2-135m",
    model_layers=30,
    fragment_id="frag-0",
    layers=(0, 10),
    max_tokens=64,
    developer="alice",
)


def receipt(seq: int = 1, cumulative: int | None = None, tokens: tuple[int, int] = (0, 4), **kw: Any) -> Receipt:
    """Receipt ``seq`` of the assigned work; ``cumulative`` defaults to this receipt's own units."""
    fields: dict[str, Any] = dict(
        job_id="job-1",
        supplier=SUPPLIER_ID,
        fragment_id="frag-0",
        layers=(0, 10),
        tokens=tokens,
        input_hash=H_IN,
        output_hash=H_OUT,
        seq=seq,
        cumulative_units=0,
        model="smollm2-135m",
    )
    fields.update(kw)
    own = (fields["tokens"][1] - fields["tokens"][0]) * (fields["layers"][1] - fields["layers"][0])
    fields["cumulative_units"] = own if cumulative is None else cumulative
    return Receipt(**fields)


def full(r: Receipt) -> SignedReceipt:
    """Signed by the supplier and countersigned by the job's client."""
    return countersign(CLIENT, sign_receipt(SUPPLIER, r))


# -- canonical bytes and signatures ---------------------------------------------------------------


def test_canonical_bytes_are_prefixed_sorted_json_and_cover_every_field() -> None:
    r = receipt()
    raw = r.canonical_bytes()
    assert raw.startswith(RECEIPT_CONTEXT)
    body = raw[len(RECEIPT_CONTEXT) :]
    assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    assert receipt().canonical_bytes() == raw  # deterministic
    changes = dict(
        job_id="job-2",
        fragment_id="frag-1",
        layers=(0, 9),
        tokens=(1, 4),
        input_hash=H_OUT,
        output_hash=H_IN,
        seq=2,
        cumulative_units=999,
        model="other",
        supplier=OTHER.peer_id("n"),
    )
    for name, value in changes.items():
        assert dataclasses.replace(r, **{name: value}).canonical_bytes() != raw, name


def test_sign_countersign_and_wire_round_trip() -> None:
    signed = full(receipt())
    assert supplier_signature_valid(signed)
    assert countersignature_valid(signed)
    back = SignedReceipt.from_json(signed.to_json())
    assert back == signed
    assert supplier_signature_valid(back) and countersignature_valid(back)
    assert back.to_json() == signed.to_json()


def test_only_the_suppliers_own_key_can_sign_and_bad_supplier_signatures_are_not_countersigned() -> None:
    with pytest.raises(ReceiptError, match="not the one"):
        sign_receipt(OTHER, receipt())
    forged = SignedReceipt(receipt(), OTHER.public_key, OTHER.sign(receipt().canonical_bytes()))
    assert not supplier_signature_valid(forged)  # valid signature, but the key does not hash to the id
    with pytest.raises(ReceiptError, match="does not verify"):
        countersign(CLIENT, forged)


def test_a_signature_covers_exactly_the_receipt_and_its_context() -> None:
    signed = sign_receipt(SUPPLIER, receipt())
    more = dataclasses.replace(signed, receipt=receipt(cumulative=400))
    assert not supplier_signature_valid(more)
    body = receipt().canonical_bytes()[len(RECEIPT_CONTEXT) :]  # the same JSON without the domain prefix
    assert not supplier_signature_valid(dataclasses.replace(signed, supplier_sig=SUPPLIER.sign(body)))
    # the client's countersignature binds the supplier's signature: not movable to another receipt
    one, two = full(receipt()), sign_receipt(SUPPLIER, receipt(seq=2, cumulative=80))
    assert not countersignature_valid(dataclasses.replace(two, countersignature=one.countersignature))


def test_receipt_rejects_cumulative_below_its_own_work() -> None:
    with pytest.raises(ReceiptError, match="less than its own work"):
        receipt(tokens=(0, 4), cumulative=39)


def test_activation_hash_is_sha256_hex() -> None:
    assert activation_hash(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# -- strict wire parsing --------------------------------------------------------------------------


def _wire() -> dict[str, Any]:
    return json.loads(full(receipt()).to_json())


def _set(path: str, value: Any) -> dict[str, Any]:
    data = _wire()
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[leaf] = value
    return data


def _drop(path: str) -> dict[str, Any]:
    data = _wire()
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    del node[leaf]
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_drop("receipt.seq"), "lacks field"),
        (_drop("supplier"), "lacks field"),
        (_drop("client.sig"), "lacks field"),
        (_set("receipt.extra", 1), "unknown field"),
        (_set("bonus", 1), "unknown field"),
        (_set("client.note", "x"), "unknown field"),
        (_set("v", 2), "version"),
        (_set("receipt.seq", "1"), "seq"),
        (_set("receipt.seq", True), "seq"),
        (_set("receipt.seq", 0), "seq"),
        (_set("receipt.seq", 1.0), "seq"),
        (_set("receipt.seq", 2**63), "seq"),
        (_set("receipt.cumulative_units", None), "cumulative_units"),
        (_set("receipt.layers", [0]), "layers"),
        (_set("receipt.layers", [3, 3]), "layers"),
        (_set("receipt.layers", "0-10"), "layers"),
        (_set("receipt.tokens", [-1, 4]), "tokens"),
        (_set("receipt.input_hash", H_IN.upper()), "input_hash"),
        (_set("receipt.output_hash", H_OUT[:-1]), "output_hash"),
        (_set("receipt.job_id", ""), "job_id"),
        (_set("receipt.model", 7), "model"),
        (_set("receipt.supplier", "node-1"), "supplier"),
        (_set("receipt", []), "JSON object"),
        (_set("supplier.key", "!!!not base64!!!"), "supplier key"),
        (_set("supplier.sig", "AAAA"), "supplier signature"),
        (_set("client.key", 12), "client key"),
        (_set("client.peer_id", "nobody"), "peer_id"),
    ],
)
def test_wire_parsing_is_strict(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ReceiptError, match=message):
        SignedReceipt.from_json(json.dumps(data))


def test_wire_parsing_refuses_non_canonical_base64_duplicates_garbage_and_huge_input() -> None:
    data = _wire()
    key = data["supplier"]["key"]  # 32 bytes: 43 characters + "=", the last one carrying 2 spare bits
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
    same_bytes = key[:42] + alphabet[alphabet.index(key[42]) ^ 1] + "="
    assert base64.b64decode(same_bytes) == base64.b64decode(key) and same_bytes != key
    data["supplier"]["key"] = same_bytes
    with pytest.raises(ReceiptError, match="non-canonical"):
        SignedReceipt.from_json(json.dumps(data))
    text = full(receipt()).to_json()
    with pytest.raises(ReceiptError, match="repeats"):
        SignedReceipt.from_json(text[:-1] + ',"v":1}')
    with pytest.raises(ReceiptError, match="not JSON"):
        SignedReceipt.from_json(text[:-2])
    with pytest.raises(ReceiptError, match="bytes"):
        SignedReceipt.from_json(" " * 20_000)


def test_a_receipt_without_countersignature_travels_as_null() -> None:
    signed = sign_receipt(SUPPLIER, receipt())
    data = json.loads(signed.to_json())
    assert data["client"] is None
    assert SignedReceipt.from_json(signed.to_json()) == signed


# -- route chaining -------------------------------------------------------------------------------


def test_check_route_follows_activation_hashes_and_layers() -> None:
    h = [activation_hash(bytes([i])) for i in range(4)]
    hops = [
        receipt(layers=(0, 10), input_hash=h[0], output_hash=h[1]),
        receipt(layers=(10, 20), input_hash=h[1], output_hash=h[2], supplier=OTHER.peer_id("n")),
        receipt(layers=(20, 30), input_hash=h[2], output_hash=h[3]),
    ]
    check_route(hops, input_hash=h[0], output_hash=h[3])
    with pytest.raises(ReceiptError, match="hop 0"):
        check_route(hops, input_hash=h[1], output_hash=h[3])
    with pytest.raises(ReceiptError, match="last hop"):
        check_route(hops, input_hash=h[0], output_hash=h[2])
    with pytest.raises(ReceiptError, match=r"hop 1 .* input"):
        check_route(
            [hops[0], dataclasses.replace(hops[1], input_hash=h[3]), hops[2]], input_hash=h[0], output_hash=h[3]
        )
    with pytest.raises(ReceiptError, match=r"hop 2 .* layer"):
        check_route([*hops[:2], dataclasses.replace(hops[2], layers=(21, 30))], input_hash=h[0], output_hash=h[3])


# -- crediting ------------------------------------------------------------------------------------


def test_cumulative_credit_arithmetic() -> None:
    book = CreditBook()
    book.assign(ASSIGNMENT)
    # prefill of 4 tokens through 10 layers, then one token per receipt
    d1 = book.submit(full(receipt(seq=1, tokens=(0, 4))))
    d2 = book.submit(full(receipt(seq=2, tokens=(4, 5), cumulative=50)))
    d3 = book.submit(full(receipt(seq=3, tokens=(5, 6), cumulative=60)))
    assert [d.units for d in (d1, d2, d3)] == [40, 10, 10]
    assert all(d.ok for d in (d1, d2, d3))
    assert book.last("job-1", SUPPLIER_ID) == Credited(3, 60)
    # receipt 4 is lost; receipt 5's cumulative covers it: nothing lost
    d5 = book.submit(full(receipt(seq=5, tokens=(7, 8), cumulative=80)))
    assert d5.ok and d5.units == 20
    assert sum(d.units for d in (d1, d2, d3, d5)) == 80 == book.last("job-1", SUPPLIER_ID).cumulative_units


def test_a_replayed_receipt_adds_no_credit() -> None:
    book = CreditBook()
    book.assign(ASSIGNMENT)
    first, second = full(receipt(seq=1)), full(receipt(seq=2, tokens=(4, 5), cumulative=50))
    assert book.submit(first).units == 40
    assert book.submit(second).units == 10
    for again in (first, second, SignedReceipt.from_json(second.to_json())):
        d = book.submit(again)
        assert (d.ok, d.reject, d.units) == (False, Reject.REPLAY, 0)
    # a higher seq that does not grow the cumulative is a replay too, and so is a lower seq with more units
    assert book.submit(full(receipt(seq=3, tokens=(4, 5), cumulative=50))).reject is Reject.REPLAY
    assert book.submit(full(receipt(seq=2, tokens=(5, 6), cumulative=60))).reject is Reject.REPLAY
    assert book.last("job-1", SUPPLIER_ID) == Credited(2, 50)


def test_a_receipt_signed_only_by_the_supplier_earns_nothing() -> None:
    d = decide(ASSIGNMENT, Credited(), sign_receipt(SUPPLIER, receipt()))
    assert (d.reject, d.units, d.state) == (Reject.NOT_COUNTERSIGNED, 0, Credited())


def _foreign_job() -> SignedReceipt:
    return full(receipt(job_id="job-2"))


def _foreign_supplier() -> SignedReceipt:  # another node, validly signed by itself, claims the job
    other = receipt(supplier=OTHER.peer_id("n"))
    return countersign(CLIENT, sign_receipt(OTHER, other))


def _foreign_client() -> SignedReceipt:  # countersigned, validly, by someone who is not the job's client
    return countersign(OTHER, sign_receipt(SUPPLIER, receipt()))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_foreign_job, Reject.NO_ASSIGNMENT),
        (_foreign_supplier, Reject.NO_ASSIGNMENT),
        (lambda: full(receipt(layers=(0, 11))), Reject.WRONG_LAYERS),
        (lambda: full(receipt(layers=(10, 20))), Reject.WRONG_LAYERS),
        (lambda: full(receipt(fragment_id="frag-1")), Reject.WRONG_FRAGMENT),
        (lambda: full(receipt(model="llama-70b")), Reject.WRONG_MODEL),
        (_foreign_client, Reject.WRONG_CLIENT),
        (lambda: full(receipt(tokens=(60, 65), cumulative=650)), Reject.BEYOND_ASSIGNMENT),
        (lambda: full(receipt(tokens=(0, 4), cumulative=641)), Reject.BEYOND_ASSIGNMENT),
    ],
)
def test_receipts_for_unassigned_work_earn_nothing(make: Any, reason: Reject) -> None:
    d = decide(ASSIGNMENT, Credited(), make())
    assert (d.ok, d.reject, d.units) == (False, reason, 0)


def test_no_assignment_at_all_earns_nothing() -> None:
    book = CreditBook()
    d = book.submit(full(receipt()))
    assert (d.reject, d.units) == (Reject.NO_ASSIGNMENT, 0)
    book.assign(ASSIGNMENT)
    assert book.submit(full(receipt())).units == 40
    book.forget("job-1")
    assert book.submit(full(receipt(seq=2, tokens=(4, 5), cumulative=50))).reject is Reject.NO_ASSIGNMENT


def test_the_whole_budget_is_creditable() -> None:
    d = decide(ASSIGNMENT, Credited(), full(receipt(tokens=(0, 64), cumulative=640)))
    assert d.ok and d.units == 640


def test_forged_signatures_earn_nothing() -> None:
    good = full(receipt())
    # supplier signature by another key that claims the supplier's id
    fake_supplier = SignedReceipt(receipt(), OTHER.public_key, OTHER.sign(receipt().canonical_bytes()))
    fake_supplier = countersign_unchecked(CLIENT, fake_supplier)
    # the receipt inflated after both signed it
    inflated = dataclasses.replace(good, receipt=receipt(cumulative=400))
    # random bytes as the supplier signature
    garbage = dataclasses.replace(good, supplier_sig=bytes(64))
    # a countersignature by another key claiming the client's id
    assert good.countersignature is not None
    fake_client = dataclasses.replace(
        good, countersignature=dataclasses.replace(good.countersignature, key=OTHER.public_key)
    )
    bad_client_sig = dataclasses.replace(
        good, countersignature=dataclasses.replace(good.countersignature, sig=bytes(64))
    )
    cases = [
        (fake_supplier, Reject.BAD_SUPPLIER_SIGNATURE),
        (inflated, Reject.BAD_SUPPLIER_SIGNATURE),
        (garbage, Reject.BAD_SUPPLIER_SIGNATURE),
        (fake_client, Reject.BAD_CLIENT_SIGNATURE),
        (bad_client_sig, Reject.BAD_CLIENT_SIGNATURE),
    ]
    for signed, reason in cases:
        d = decide(ASSIGNMENT, Credited(), SignedReceipt.from_json(signed.to_json()))
        assert (d.reject, d.units) == (reason, 0)
    assert decide(ASSIGNMENT, Credited(), good).units == 40


def countersign_unchecked(identity: Identity, signed: SignedReceipt) -> SignedReceipt:
    """A client that countersigns without checking (what a colluding client would do)."""
    from engine.ledger.receipts import Countersignature, countersign_message

    client = identity.peer_id("c")
    sig = identity.sign(countersign_message(client, signed))
    return dataclasses.replace(signed, countersignature=Countersignature(client, identity.public_key, sig))


def test_cumulative_that_grows_less_than_the_receipts_own_work_is_rejected() -> None:
    d = decide(ASSIGNMENT, Credited(1, 40), full(receipt(seq=2, tokens=(4, 8), cumulative=45)))
    assert (d.reject, d.units) == (Reject.INCONSISTENT, 0)


def test_ledger_entries_price_cumulatively_without_rounding_loss() -> None:
    pricing = Pricing(default=1, prices={"smollm2-135m": 200_000})  # 0.20 per million tokens
    book = CreditBook()
    book.assign(ASSIGNMENT)
    entries = []
    signed = full(receipt(seq=1, tokens=(0, 4)))
    entries += ledger_entries(book.submit(signed), signed, ASSIGNMENT, pricing)
    for seq in range(2, 61):  # one decode token per receipt: 10 units each, a fraction of a micro-unit
        signed = full(receipt(seq=seq, tokens=(seq + 2, seq + 3), cumulative=40 + 10 * (seq - 1)))
        entries += ledger_entries(book.submit(signed), signed, ASSIGNMENT, pricing)
    credits = [e for e in entries if e.kind == "credit"]
    debits = [e for e in entries if e.kind == "debit"]
    assert len(credits) == len(debits) == 60
    total_units = 40 + 10 * 59
    assert sum(e.units for e in credits) == total_units
    # 630 token-layers of a 30-layer model = 21 tokens at 0.2 micro-units each = 4.2 -> 4
    assert sum(e.amount for e in credits) == total_units * 200_000 // (1_000_000 * 30) == 4
    assert {e.account for e in credits} == {SUPPLIER_ID} and {e.account for e in debits} == {"alice"}
    assert [(c.units, c.amount, c.receipt) for c in credits] == [(d.units, d.amount, d.receipt) for d in debits]
    assert SignedReceipt.from_json(credits[-1].receipt).receipt.seq == 60
    rejected = book.submit(signed)
    assert ledger_entries(rejected, signed, ASSIGNMENT, pricing) == []


def test_credit_book_revert_and_restore() -> None:
    book = CreditBook()
    book.assign(ASSIGNMENT)
    one = full(receipt(seq=1))
    two = full(receipt(seq=2, tokens=(4, 5), cumulative=50))
    book.submit(one)
    d = book.submit(two)
    book.revert(d)  # its ledger rows could not be written: the receipt may be submitted again
    assert book.last("job-1", SUPPLIER_ID) == Credited(1, 40)
    assert book.submit(two).units == 10
    restored = CreditBook()
    assert restored.restore([one.to_json(), two.to_json(), "{broken"]) == 2
    assert restored.last("job-1", SUPPLIER_ID) == Credited(2, 50)
    restored.assign(ASSIGNMENT)
    assert restored.submit(two).reject is Reject.REPLAY
