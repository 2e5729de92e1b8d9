"""Work receipts: what a supplier claims it computed for a job, signed by it and countersigned by the client.

Why. Suppliers are paid for work nobody else watched, so a claim needs two signatures: the
supplier's (it did this work: these layers on these tokens, turning input bytes with this hash into
output bytes with that hash) and the client's (the job's owner saw the work arrive and accepts to
pay for it). A supplier alone cannot mint credit and a client alone cannot make a supplier claim
work it did not do.

Each receipt carries its sequence number (per job and supplier, from 1) and the CUMULATIVE units
of work so far in the job, not just its own: the ledger credits ``cumulative - last credited``, so
a lost receipt loses nothing (the next one covers it) and a replayed one adds nothing (it is not
above the last credited). A unit is one token through one layer; see ``pricing``.

Signatures are ed25519 by the keys behind self-certifying peer ids (``engine.transport.identity``):
a signature only counts when the key that made it hashes to the peer id it speaks for. Every signed
message starts with its own domain-separation prefix, so a receipt signature is never valid as an
SDP or hello signature, nor a supplier's signature as a countersignature, and vice versa.

What a countersignature does not prove: that the intermediate activations were right. The client
only sees what it sent to the first hop and what came back from the last; ``check_route`` checks
that the hops' receipts chain up between those two, so a hop cannot claim work on bytes that never
flowed through the route.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import IdentityError, ProtocolError
from engine.transport.identity import Identity, decode_b64, encode_b64, key_id, key_id_of, verify

#: Domain separation of the supplier's signature (over the canonical receipt).
RECEIPT_CONTEXT = b"kluster-receipt-v1\n"
#: Domain separation of the client's countersignature (over the receipt and the supplier's signature).
COUNTERSIGN_CONTEXT = b"kluster-receipt-countersign-v1\n"
#: The wire format's version field.
WIRE_VERSION = 1
#: A signed receipt on the wire is a few hundred bytes; anything far larger is refused unread.
MAX_WIRE_BYTES = 16_384
#: Integers must fit a signed 64-bit SQLite INTEGER.
MAX_INT = 2**63 - 1

_PUBLIC_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_MAX_TEXT = 256
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RECEIPT_FIELDS = frozenset(
    {
        "job_id",
        "supplier",
        "fragment_id",
        "layers",
        "tokens",
        "input_hash",
        "output_hash",
        "seq",
        "cumulative_units",
        "model",
    }
)
_WIRE_FIELDS = frozenset({"v", "receipt", "supplier", "client"})
_SUPPLIER_FIELDS = frozenset({"key", "sig"})
_CLIENT_FIELDS = frozenset({"peer_id", "key", "sig"})


class ReceiptError(ProtocolError):
    """A receipt is malformed (missing, unknown or mistyped fields, bad base64) or cannot be signed."""

    code = "bad_receipt"


def activation_hash(data: bytes) -> str:
    """The hash a receipt records for activation bytes: lowercase hex sha256."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Receipt:
    """One supplier's work for one job: layers ``[start, end)`` of a fragment run on token positions
    ``[start, end)``. Validated on construction, so a Receipt in memory is always well formed."""

    job_id: str
    #: the supplier's peer id (``n-<key id>``): the key that signs must hash to it
    supplier: str
    fragment_id: str
    #: half-open layer range, as routes print them ([0, 10] is layers 0-9)
    layers: tuple[int, int]
    #: half-open range of token positions this receipt covers (prefill covers the whole prompt)
    tokens: tuple[int, int]
    #: sha256 hex of the activation bytes the supplier received and sent for this work
    input_hash: str
    output_hash: str
    #: per (job, supplier), from 1, one more per receipt
    seq: int
    #: units (tokens x layers) of every receipt of this job and supplier so far, this one included
    cumulative_units: int
    model: str

    def __post_init__(self) -> None:
        for name in ("job_id", "fragment_id", "model"):
            _check_text(getattr(self, name), name)
        _check_text(self.supplier, "supplier")
        if key_id_of(self.supplier) is None:
            raise ReceiptError(f"receipt field supplier is not a peer id: {self.supplier!r}")
        _check_range(self.layers, "layers")
        _check_range(self.tokens, "tokens")
        for name in ("input_hash", "output_hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX64.fullmatch(value):
                raise ReceiptError(f"receipt field {name} must be 64 lowercase hex digits (sha256)")
        _check_int(self.seq, "seq", minimum=1)
        _check_int(self.cumulative_units, "cumulative_units", minimum=1)
        if self.cumulative_units < self.units:
            raise ReceiptError(
                f"receipt cumulative_units {self.cumulative_units} is less than its own work ({self.units} units)"
            )

    @property
    def units(self) -> int:
        """This receipt's own work: tokens x layers."""
        return (self.tokens[1] - self.tokens[0]) * (self.layers[1] - self.layers[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "supplier": self.supplier,
            "fragment_id": self.fragment_id,
            "layers": list(self.layers),
            "tokens": list(self.tokens),
            "input_hash": self.input_hash,
            "output_hash": self.output_hash,
            "seq": self.seq,
            "cumulative_units": self.cumulative_units,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, data: object) -> Receipt:
        fields = _exact_fields(data, _RECEIPT_FIELDS, "receipt")
        return cls(
            job_id=fields["job_id"],
            supplier=fields["supplier"],
            fragment_id=fields["fragment_id"],
            layers=_range_from_wire(fields["layers"], "layers"),
            tokens=_range_from_wire(fields["tokens"], "tokens"),
            input_hash=fields["input_hash"],
            output_hash=fields["output_hash"],
            seq=fields["seq"],
            cumulative_units=fields["cumulative_units"],
            model=fields["model"],
        )

    def canonical_bytes(self) -> bytes:
        """What the supplier signs: the prefix, then JSON with sorted keys and no spaces (ASCII only)."""
        body = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return RECEIPT_CONTEXT + body.encode("ascii")


@dataclass(frozen=True)
class Countersignature:
    """The client's acceptance of a supplier-signed receipt."""

    #: the client's peer id (``c-<key id>``): the key must hash to it
    client: str
    key: bytes
    sig: bytes


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt with its supplier's signature and, once the client accepted it, a countersignature.

    Holding one proves nothing by itself: check it with :func:`supplier_signature_valid` and
    :func:`countersignature_valid` (``credit.decide`` does both).
    """

    receipt: Receipt
    supplier_key: bytes
    supplier_sig: bytes
    countersignature: Countersignature | None = None

    def to_dict(self) -> dict[str, Any]:
        cs = self.countersignature
        return {
            "v": WIRE_VERSION,
            "receipt": self.receipt.to_dict(),
            "supplier": {"key": encode_b64(self.supplier_key), "sig": encode_b64(self.supplier_sig)},
            "client": None
            if cs is None
            else {"peer_id": cs.client, "key": encode_b64(cs.key), "sig": encode_b64(cs.sig)},
        }

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, no spaces): what travels and what the ledger stores."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_dict(cls, data: object) -> SignedReceipt:
        fields = _exact_fields(data, _WIRE_FIELDS, "signed receipt")
        version = fields["v"]
        if type(version) is not int or version != WIRE_VERSION:
            raise ReceiptError(f"signed receipt version must be {WIRE_VERSION}, got {version!r}")
        receipt = Receipt.from_dict(fields["receipt"])
        supplier = _exact_fields(fields["supplier"], _SUPPLIER_FIELDS, "supplier signature")
        client = fields["client"]
        countersignature = None
        if client is not None:
            cs = _exact_fields(client, _CLIENT_FIELDS, "client countersignature")
            _check_text(cs["peer_id"], "client peer_id")
            if key_id_of(cs["peer_id"]) is None:
                raise ReceiptError(f"client peer_id is not a peer id: {cs['peer_id']!r}")
            countersignature = Countersignature(
                client=cs["peer_id"],
                key=_b64(cs["key"], _PUBLIC_KEY_BYTES, "client key"),
                sig=_b64(cs["sig"], _SIGNATURE_BYTES, "client signature"),
            )
        return cls(
            receipt=receipt,
            supplier_key=_b64(supplier["key"], _PUBLIC_KEY_BYTES, "supplier key"),
            supplier_sig=_b64(supplier["sig"], _SIGNATURE_BYTES, "supplier signature"),
            countersignature=countersignature,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedReceipt:
        """Parse the wire form strictly: any deviation is a :class:`ReceiptError` saying what."""
        if len(text) > MAX_WIRE_BYTES:
            raise ReceiptError(f"signed receipt is {len(text)} bytes, more than {MAX_WIRE_BYTES}")
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ReceiptError(f"signed receipt is not JSON: {exc}") from None
        return cls.from_dict(data)


# -- signing and checking ------------------------------------------------------------------------


def sign_receipt(identity: Identity, receipt: Receipt) -> SignedReceipt:
    """The supplier's signature over ``receipt``; ``identity`` must be the key its supplier id names."""
    if key_id_of(receipt.supplier) != identity.id:
        raise ReceiptError(f"cannot sign: this identity's key is not the one {receipt.supplier} names")
    return SignedReceipt(receipt, identity.public_key, identity.sign(receipt.canonical_bytes()))


def countersign(identity: Identity, signed: SignedReceipt, *, tag: str = "c") -> SignedReceipt:
    """The client's countersignature: over the receipt AND the supplier's signature on it.

    Refuses a receipt whose supplier signature does not verify (countersigning it would be
    worthless). The caller must first check that the receipt describes work it saw: its job,
    token range and, with :func:`check_route`, activation hashes.
    """
    if not supplier_signature_valid(signed):
        raise ReceiptError(f"cannot countersign: the supplier signature of {signed.receipt.supplier} does not verify")
    client = identity.peer_id(tag)
    sig = identity.sign(countersign_message(client, signed))
    return SignedReceipt(
        signed.receipt, signed.supplier_key, signed.supplier_sig, Countersignature(client, identity.public_key, sig)
    )


def countersign_message(client: str, signed: SignedReceipt) -> bytes:
    """What the client signs: prefix, its own peer id, the supplier's 64-byte signature, the receipt.

    Peer ids never contain a newline and the signature has a fixed size, so the parts cannot be
    shifted into one another.
    """
    return COUNTERSIGN_CONTEXT + client.encode("ascii") + b"\n" + signed.supplier_sig + signed.receipt.canonical_bytes()


def supplier_signature_valid(signed: SignedReceipt) -> bool:
    """Whether the supplier's key hashes to the receipt's supplier id and signed exactly this receipt."""
    return _key_speaks_for(signed.supplier_key, signed.receipt.supplier) and verify(
        signed.supplier_key, signed.supplier_sig, signed.receipt.canonical_bytes()
    )


def countersignature_valid(signed: SignedReceipt) -> bool:
    """Whether a countersignature is present, its key hashes to its client id, and it signed this
    receipt with this supplier signature."""
    cs = signed.countersignature
    return (
        cs is not None
        and _key_speaks_for(cs.key, cs.client)
        and verify(cs.key, cs.sig, countersign_message(cs.client, signed))
    )


def check_route(receipts: Sequence[Receipt], *, input_hash: str, output_hash: str) -> None:
    """Raise :class:`ReceiptError` unless the hops' receipts (in route order) chain from what the
    client sent (``input_hash``) to what it received (``output_hash``) over contiguous layers.

    Each hop's input must be the previous hop's output, and its layers must start where the
    previous hop's ended; all must be one job and one token range.
    """
    if not receipts:
        raise ReceiptError("a route has at least one hop")
    first = receipts[0]
    if first.input_hash != input_hash:
        raise ReceiptError(f"hop 0 ({first.supplier}) claims an input the client did not send")
    for i, (prev, cur) in enumerate(itertools.pairwise(receipts), start=1):
        if (cur.job_id, cur.tokens) != (first.job_id, first.tokens):
            raise ReceiptError(f"hop {i} ({cur.supplier}) is for another job or token range")
        if cur.input_hash != prev.output_hash:
            raise ReceiptError(f"hop {i} ({cur.supplier}) claims an input hop {i - 1} did not send")
        if cur.layers[0] != prev.layers[1]:
            raise ReceiptError(f"hop {i} ({cur.supplier}) starts at layer {cur.layers[0]}, not {prev.layers[1]}")
    if receipts[-1].output_hash != output_hash:
        raise ReceiptError(f"the last hop ({receipts[-1].supplier}) claims an output the client did not receive")


# -- strict parsing helpers ----------------------------------------------------------------------


def _key_speaks_for(public_key: bytes, peer_id: str) -> bool:
    kid = key_id_of(peer_id)
    return kid is not None and len(public_key) == _PUBLIC_KEY_BYTES and key_id(public_key) == kid


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ReceiptError(f"signed receipt repeats the field {key!r}")
        out[key] = value
    return out


def _exact_fields(data: object, expected: frozenset[str], what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ReceiptError(f"{what} must be a JSON object, got {type(data).__name__}")
    missing = expected - data.keys()
    if missing:
        raise ReceiptError(f"{what} lacks field(s) {', '.join(sorted(missing))}")
    unknown = data.keys() - expected
    if unknown:
        raise ReceiptError(f"{what} has unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    return data


def _check_text(value: object, name: str) -> None:
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT or not value.isprintable():
        raise ReceiptError(f"receipt field {name} must be printable text of 1-{_MAX_TEXT} characters")


def _check_int(value: object, name: str, *, minimum: int) -> None:
    # type() and not isinstance(): JSON true must not pass as 1
    if type(value) is not int or not minimum <= value <= MAX_INT:
        raise ReceiptError(f"receipt field {name} must be an integer >= {minimum}, got {value!r}")


def _check_range(value: object, name: str) -> None:
    if not isinstance(value, tuple) or len(value) != 2:
        raise ReceiptError(f"receipt field {name} must be [start, end]")
    start, end = value
    _check_int(start, f"{name} start", minimum=0)
    _check_int(end, f"{name} end", minimum=1)
    if end <= start:
        raise ReceiptError(f"receipt field {name} must have start < end, got [{start}, {end}]")


def _range_from_wire(value: object, name: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ReceiptError(f"receipt field {name} must be [start, end]")
    return (value[0], value[1])


def _b64(value: object, size: int, what: str) -> bytes:
    try:
        raw = decode_b64(value, size, what)
    except IdentityError as exc:
        raise ReceiptError(f"signed receipt has {exc}") from None
    if encode_b64(raw) != value:  # one encoding per value: no malleable padding bits
        raise ReceiptError(f"signed receipt has no valid {what} (non-canonical base64)")
    return raw
