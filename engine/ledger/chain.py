"""The ledger's hash chain, as pure functions: what a row is, its hash, and the walk that checks them.

Why a chain. The ledger is what suppliers get paid from, and it lives in a SQLite file that anyone
with access to the coordinator's disk can open and edit. Each row's hash covers every field of the
row AND the previous row's hash, so editing any field of any row, deleting a row or reordering rows
breaks the chain at that row, and :func:`verify_rows` names the first such row.

What a chain cannot catch on its own: someone who rewrites a row and then recomputes every later
hash, or who cuts rows off the end and also resets SQLite's record of the highest id ever used
(``sqlite_sequence``, which catches a plain tail deletion). Against those, publish the head
(``Ledger.head()``: last id and hash) somewhere the ledger's host cannot rewrite, and compare.

Rows are numbered from 1 without gaps, so a deleted row shows as a missing number. Times are
integer microseconds since the Unix epoch (UTC) and amounts integer micro-units of currency, so
the hashed encoding never depends on how a float prints.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

#: prev_hash of row 1
GENESIS_HASH = "0" * 64
#: Domain separation of the row hash (changes if the encoding ever does).
ROW_CONTEXT = "kluster-ledger-row-v1"
#: Column order, in the table and in the hashed encoding (row_hash itself excluded from the latter).
COLUMNS = ("id", "time", "kind", "account", "job_id", "model", "units", "amount", "receipt", "prev_hash", "row_hash")
_MAX_TEXT = 256
_INT_COLUMNS = frozenset({"id", "time", "units", "amount"})


class Kind(StrEnum):
    """What a row records. Amounts are never negative: the kind says which way money moves."""

    #: a supplier earned ``amount`` for ``units`` of work on a job (the receipt is attached)
    CREDIT = "credit"
    #: a developer (tenant) owes ``amount`` for ``units`` of work on a job
    DEBIT = "debit"
    #: a supplier was paid out ``amount``
    PAYOUT = "payout"
    #: a developer paid in ``amount``
    DEPOSIT = "deposit"
    #: a supplier's earlier credits for a job taken back: a spot check caught it returning wrong work
    CLAWBACK = "clawback"
    #: a developer's debits for that work given back
    REFUND = "refund"


#: what nets against what in a statement: earnings are credits less clawbacks, spend debits less refunds
OFFSETS = {Kind.CREDIT: Kind.CLAWBACK, Kind.DEBIT: Kind.REFUND}


@dataclass(frozen=True)
class Entry:
    """What a caller appends: a row without its id, time and hashes (the ledger adds those)."""

    kind: Kind
    #: a supplier's peer id, or a developer's tenant name
    account: str
    #: the job the units were for; empty for payouts and deposits
    job_id: str
    model: str
    #: tokens x layers (see ``engine.ledger.pricing``)
    units: int
    #: integer micro-units of currency, >= 0
    amount: int
    #: the signed receipt's JSON behind a credit or debit, else empty
    receipt: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):
            raise ValueError(f"ledger entry kind must be a Kind, got {self.kind!r}")
        if not isinstance(self.account, str) or not self.account or len(self.account) > _MAX_TEXT:
            raise ValueError(f"ledger entry account must be 1-{_MAX_TEXT} characters, got {self.account!r}")
        for name in ("job_id", "model", "receipt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"ledger entry {name} must be text")
        for name in ("units", "amount"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:  # floats and bools refused: money stays exact
                raise ValueError(f"ledger entry {name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class Row:
    """One stored row. ``time`` is microseconds since the Unix epoch, UTC."""

    id: int
    time: int
    kind: str
    account: str
    job_id: str
    model: str
    units: int
    amount: int
    receipt: str
    prev_hash: str
    row_hash: str

    def values(self) -> tuple[object, ...]:
        return tuple(getattr(self, c) for c in COLUMNS)


def hash_fields(fields: Sequence[object]) -> str:
    """sha256 hex of the row encoding: JSON of the context and every column but row_hash, in order.

    JSON makes the encoding unambiguous (strings are quoted and escaped, so no field can run into
    the next) and ``ensure_ascii`` makes it one byte string per value.
    """
    body = json.dumps([ROW_CONTEXT, *fields], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode("ascii")).hexdigest()


def seal(row_id: int, time_us: int, entry: Entry, prev_hash: str) -> Row:
    """The row that appending ``entry`` after a row hashed ``prev_hash`` stores."""
    fields = (
        row_id,
        time_us,
        entry.kind.value,
        entry.account,
        entry.job_id,
        entry.model,
        entry.units,
        entry.amount,
        entry.receipt,
        prev_hash,
    )
    return Row(*fields, row_hash=hash_fields(fields))


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of walking the chain: ``ok``, or the first broken row and why."""

    ok: bool
    #: rows read (all of them when ok)
    rows: int
    broken_at: int | None = None
    reason: str = ""
    #: (id, row_hash) of the last row, (0, GENESIS_HASH) when empty; compare it with a published head
    head: tuple[int, str] = (0, GENESIS_HASH)


def verify_rows(rows: Iterable[Sequence[object]], *, highest_id_used: int = 0) -> VerifyResult:
    """Recompute the chain over ``rows`` (tuples in ``COLUMNS`` order, ascending id) and name the first break.

    ``highest_id_used`` is the largest id the table ever held (SQLite's ``sqlite_sequence``); a
    chain that ends below it lost rows from its end.
    """
    count = 0
    prev_id, prev_hash = 0, GENESIS_HASH
    for raw in rows:
        row_id = raw[0]
        expected = prev_id + 1
        if type(row_id) is not int:
            return _broken(count, expected, "its id is not an integer", prev_id, prev_hash)
        if row_id != expected:
            what = (
                f"row {expected} is missing" if row_id == expected + 1 else f"rows {expected}-{row_id - 1} are missing"
            )
            return _broken(count, expected, f"{what} (deleted, or renumbered)", prev_id, prev_hash)
        bad = _bad_column(raw)
        if bad:
            return _broken(count, row_id, f"column {bad} has the wrong type (edited)", prev_id, prev_hash)
        if hash_fields(raw[:-1]) != raw[-1]:
            return _broken(count, row_id, "its contents do not match its hash (edited)", prev_id, prev_hash)
        if raw[-2] != prev_hash:
            reason = "it does not follow the previous row (reordered, or an earlier row was replaced)"
            return _broken(count, row_id, reason, prev_id, prev_hash)
        count += 1
        prev_id, prev_hash = row_id, str(raw[-1])
    if highest_id_used > prev_id:
        reason = f"rows {prev_id + 1}-{highest_id_used} are missing (deleted from the end)"
        return _broken(count, prev_id + 1, reason, prev_id, prev_hash)
    return VerifyResult(ok=True, rows=count, head=(prev_id, prev_hash))


def _bad_column(raw: Sequence[object]) -> str | None:
    if len(raw) != len(COLUMNS):
        return "count"
    for name, value in zip(COLUMNS, raw, strict=True):
        wanted = int if name in _INT_COLUMNS else str
        if type(value) is not wanted:
            return name
    return None


def _broken(count: int, row_id: int, reason: str, prev_id: int, prev_hash: str) -> VerifyResult:
    return VerifyResult(ok=False, rows=count, broken_at=row_id, reason=reason, head=(prev_id, prev_hash))
