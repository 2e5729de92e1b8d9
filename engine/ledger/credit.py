"""Whether a signed receipt earns credit, and how much: a pure decision plus the state it needs.

A receipt earns only if it is work the coordinator assigned (this job, this supplier, this model,
fragment and layer range, within the token budget), signed by the supplier's key, countersigned
by the job's own client, and new: its sequence number and cumulative units are both above the
last credited for that (job, supplier). It then earns ``cumulative - last cumulative`` units,
so a lost receipt loses nothing (the next one's cumulative covers it) and a replayed or
reordered one adds nothing.

:func:`decide` is pure (values in, a :class:`Decision` out) so every rule is unit-tested without a
network. :class:`CreditBook` keeps the assignments and last credited state around it; it is meant
for the coordinator's event loop (two ed25519 verifications per receipt, ~0.1 ms), with the
resulting :func:`ledger_entries` appended by ``Ledger.append_many`` in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from engine.ledger.chain import Entry, Kind, Row
from engine.ledger.pricing import Pricing
from engine.ledger.receipts import ReceiptError, SignedReceipt, countersignature_valid, supplier_signature_valid

log = logging.getLogger(__name__)


class Reject(StrEnum):
    """Why a receipt earned nothing (stable strings, for logs and wire replies)."""

    NO_ASSIGNMENT = "no_assignment"
    WRONG_MODEL = "wrong_model"
    WRONG_FRAGMENT = "wrong_fragment"
    WRONG_LAYERS = "wrong_layers"
    BAD_SUPPLIER_SIGNATURE = "bad_supplier_signature"
    NOT_COUNTERSIGNED = "not_countersigned"
    WRONG_CLIENT = "wrong_client"
    BAD_CLIENT_SIGNATURE = "bad_client_signature"
    REPLAY = "replay"
    BEYOND_ASSIGNMENT = "beyond_assignment"
    INCONSISTENT = "inconsistent"
    #: the supplier was banned: a spot check caught it returning wrong work
    BANNED = "banned"


@dataclass(frozen=True)
class Assignment:
    """Work the coordinator gave a supplier in a job: the only work a receipt can be credited for."""

    job_id: str
    supplier: str
    #: the job's client peer id: only its countersignature counts
    client: str
    model: str
    #: layers of the whole model (a unit is 1/model_layers of a token, see ``pricing``)
    model_layers: int
    fragment_id: str
    #: half-open layer range the supplier serves in this job; receipts must name exactly this range
    layers: tuple[int, int]
    #: token positions the job may run (prompt + new tokens, drafts included); none at or beyond it earns
    max_tokens: int
    #: the account the job's cost is debited to (the tenant); empty means the client's peer id
    developer: str = ""

    def __post_init__(self) -> None:
        start, end = self.layers
        if not 0 <= start < end <= self.model_layers or self.max_tokens < 1:
            raise ValueError(f"bad assignment: layers {self.layers} of {self.model_layers}, {self.max_tokens} tokens")

    @property
    def max_units(self) -> int:
        """The most units the whole assignment can earn."""
        return self.max_tokens * (self.layers[1] - self.layers[0])

    @property
    def account(self) -> str:
        """Who pays for this job."""
        return self.developer or self.client


@dataclass(frozen=True)
class Credited:
    """The last credited receipt of one (job, supplier): its sequence number and cumulative units."""

    seq: int = 0
    cumulative_units: int = 0


@dataclass(frozen=True)
class Decision:
    """The verdict on one receipt. ``units`` is 0 and ``state == previous`` when rejected."""

    job_id: str
    supplier: str
    units: int
    reject: Reject | None
    detail: str
    previous: Credited
    state: Credited

    @property
    def ok(self) -> bool:
        return self.reject is None


def decide(assignment: Assignment | None, last: Credited, signed: SignedReceipt) -> Decision:
    """Credit or reject ``signed`` given the assignment for its (job, supplier) and what was credited last.

    Checks run cheapest first and the first failing one is the reason: assignment, supplier
    signature, countersignature, freshness, budget, consistency.
    """
    r = signed.receipt

    def reject(reason: Reject, detail: str) -> Decision:
        return Decision(r.job_id, r.supplier, 0, reason, detail, last, last)

    if assignment is None or (assignment.job_id, assignment.supplier) != (r.job_id, r.supplier):
        return reject(Reject.NO_ASSIGNMENT, f"job {r.job_id} was not assigned to {r.supplier}")
    if r.model != assignment.model:
        return reject(Reject.WRONG_MODEL, f"receipt is for model {r.model}, the job runs {assignment.model}")
    if r.fragment_id != assignment.fragment_id:
        return reject(Reject.WRONG_FRAGMENT, f"receipt is for fragment {r.fragment_id}, not {assignment.fragment_id}")
    if r.layers != assignment.layers:
        return reject(
            Reject.WRONG_LAYERS, f"receipt claims layers {list(r.layers)}, assigned {list(assignment.layers)}"
        )
    if not supplier_signature_valid(signed):
        return reject(Reject.BAD_SUPPLIER_SIGNATURE, f"the signature is not {r.supplier}'s over this receipt")
    cs = signed.countersignature
    if cs is None:
        return reject(Reject.NOT_COUNTERSIGNED, "the client has not countersigned this receipt")
    if cs.client != assignment.client:
        return reject(Reject.WRONG_CLIENT, f"countersigned by {cs.client}, the job's client is {assignment.client}")
    if not countersignature_valid(signed):
        return reject(Reject.BAD_CLIENT_SIGNATURE, f"the countersignature is not {cs.client}'s over this receipt")
    if r.seq <= last.seq or r.cumulative_units <= last.cumulative_units:
        return reject(
            Reject.REPLAY,
            f"seq {r.seq} / cumulative {r.cumulative_units} is not above the last credited "
            f"({last.seq} / {last.cumulative_units})",
        )
    if r.tokens[1] > assignment.max_tokens or r.cumulative_units > assignment.max_units:
        return reject(
            Reject.BEYOND_ASSIGNMENT,
            f"tokens up to {r.tokens[1]} / {r.cumulative_units} units exceed the assignment's "
            f"{assignment.max_tokens} tokens / {assignment.max_units} units",
        )
    units = r.cumulative_units - last.cumulative_units
    if units < r.units:
        return reject(Reject.INCONSISTENT, f"cumulative units grew by {units}, less than this receipt's own {r.units}")
    return Decision(r.job_id, r.supplier, units, None, "", last, Credited(r.seq, r.cumulative_units))


def ledger_entries(decision: Decision, signed: SignedReceipt, assignment: Assignment, pricing: Pricing) -> list[Entry]:
    """The rows a credited receipt adds: the supplier's credit and the developer's debit, same units
    and amount, each carrying the receipt. A rejected decision adds none.

    The amount is priced from cumulative units (``Pricing.amount_between``), so the amounts of a
    job's receipts add up to the price of its total units, without per-receipt rounding loss.
    """
    if not decision.ok:
        return []
    amount = pricing.amount_between(
        assignment.model,
        assignment.model_layers,
        decision.previous.cumulative_units,
        decision.state.cumulative_units,
    )
    receipt = signed.to_json()
    common = {"job_id": assignment.job_id, "model": assignment.model, "units": decision.units, "amount": amount}
    return [
        Entry(Kind.CREDIT, assignment.supplier, receipt=receipt, **common),
        Entry(Kind.DEBIT, assignment.account, receipt=receipt, **common),
    ]


class CreditBook:
    """Assignments and the last credited receipt per (job, supplier). Not thread-safe: one event loop.

    One assignment per (job, supplier): assigning again (a failover moved the supplier's span)
    replaces it and keeps what was credited.
    """

    def __init__(self) -> None:
        self._assignments: dict[tuple[str, str], Assignment] = {}
        self._credited: dict[tuple[str, str], Credited] = {}
        #: job -> its suppliers, so forgetting a job does not scan every job's keys
        self._suppliers: dict[str, set[str]] = {}

    def assign(self, assignment: Assignment) -> None:
        self._assignments[(assignment.job_id, assignment.supplier)] = assignment
        self._suppliers.setdefault(assignment.job_id, set()).add(assignment.supplier)

    def assignment(self, job_id: str, supplier: str) -> Assignment | None:
        return self._assignments.get((job_id, supplier))

    def last(self, job_id: str, supplier: str) -> Credited:
        return self._credited.get((job_id, supplier), Credited())

    def submit(self, signed: SignedReceipt) -> Decision:
        """Decide on ``signed`` and, if credited, remember it as the last credited."""
        key = (signed.receipt.job_id, signed.receipt.supplier)
        decision = decide(self._assignments.get(key), self.last(*key), signed)
        if decision.ok:
            self._credited[key] = decision.state
            log.debug("credited %d units to %s for job %s", decision.units, key[1], key[0])
        else:
            log.info(
                "receipt %d of %s for job %s earns nothing: %s", signed.receipt.seq, key[1], key[0], decision.detail
            )
        return decision

    def revert(self, decision: Decision) -> None:
        """Undo a credited decision whose ledger rows could not be written, unless a later one followed."""
        key = (decision.job_id, decision.supplier)
        if decision.ok and self._credited.get(key) == decision.state:
            self._credited[key] = decision.previous

    def forget(self, job_id: str) -> None:
        """Drop a finished job: later receipts for it earn nothing (no assignment)."""
        for supplier in self._suppliers.pop(job_id, ()):
            self._assignments.pop((job_id, supplier), None)
            self._credited.pop((job_id, supplier), None)

    def restore(self, receipts: Iterable[str]) -> int:
        """Rebuild the last credited state from the receipt JSON of credit rows (``Ledger.receipts()``)
        after a restart; returns how many receipts were read. Assignments must be given again."""
        count = 0
        for text in receipts:
            try:
                r = SignedReceipt.from_json(text).receipt
            except ReceiptError as exc:
                log.warning("ledger holds an unreadable receipt, skipped: %s", exc)
                continue
            key = (r.job_id, r.supplier)
            last = self.last(*key)
            if r.cumulative_units > last.cumulative_units:
                self._credited[key] = Credited(max(r.seq, last.seq), r.cumulative_units)
            count += 1
        return count


def forfeit_entries(rows: Sequence[Row], supplier: str) -> list[Entry]:
    """The rows that take back a supplier's credits in a job and refund the developer's matching debits.

    ``rows`` are the job's ledger rows (``Ledger.job_rows``); ``supplier`` the node's peer id (the
    receipts name it; the credit rows name the account that was paid). A credit and its debit carry
    the same receipt, which is how each debit is matched to the supplier. Clawbacks and refunds
    already written are netted, so forfeiting twice takes nothing more.
    """
    tag = f"forfeit:{supplier}"
    owed: dict[tuple[Kind, str], list[int]] = {}
    for row in rows:
        kind = Kind(row.kind)
        if kind in (Kind.CREDIT, Kind.DEBIT):
            try:
                if SignedReceipt.from_json(row.receipt).receipt.supplier != supplier:
                    continue
            except ReceiptError:
                continue
            back, sign = (Kind.CLAWBACK if kind is Kind.CREDIT else Kind.REFUND), 1
        elif kind in (Kind.CLAWBACK, Kind.REFUND) and row.receipt == tag:
            back, sign = kind, -1
        else:
            continue
        acc = owed.setdefault((back, row.account), [0, 0])
        acc[0] += sign * row.units
        acc[1] += sign * row.amount
    job, model = (rows[0].job_id, rows[0].model) if rows else ("", "")
    return [
        Entry(kind, account, job, model, units, amount, receipt=tag)
        for (kind, account), (units, amount) in sorted(owed.items())
        if units > 0 or amount > 0
    ]
