"""The ledger in SQLite: append-only hash-chained rows, and the statements suppliers and developers read.

Durability. WAL with ``synchronous=FULL``: an append returns only after its transaction is on
disk, so a coordinator killed at any moment keeps every row it acknowledged and never a partial
one (a transaction is whole or absent). Each :meth:`Ledger.append_many` call is one
``BEGIN IMMEDIATE`` transaction that reads the head and writes after it, so two writers (threads
or processes) can never fork the chain.

Threads. One connection guarded by a lock: the coordinator calls :meth:`Ledger.append` from a
worker thread (``asyncio.to_thread``) so the fsync never blocks its event loop; queries may run on
any thread too.

Statements use UTC day boundaries: "today" starts at 00:00 UTC, "last 7 days" is today plus the six
UTC days before it. The clock is injectable for tests.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.errors import KlusterError
from engine.ledger.chain import COLUMNS, GENESIS_HASH, OFFSETS, Entry, Kind, Row, VerifyResult, seal, verify_rows

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    time      INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    account   TEXT NOT NULL,
    job_id    TEXT NOT NULL,
    model     TEXT NOT NULL,
    units     INTEGER NOT NULL,
    amount    INTEGER NOT NULL,
    receipt   TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    row_hash  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_account ON ledger(account, kind, time);
"""
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM ledger"
_INSERT = f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_DAY_US = 86_400 * 1_000_000


class LedgerError(KlusterError):
    """The ledger file is missing, is not a ledger, or could not be written."""

    code = "ledger"


@dataclass(frozen=True)
class Totals:
    units: int = 0
    #: integer micro-units of currency
    amount: int = 0


@dataclass(frozen=True)
class Statement:
    """One account's credits (a supplier's earnings) or debits (a developer's spend)."""

    account: str
    kind: Kind
    #: the UTC day "today" refers to (ISO date)
    day: str
    today: Totals
    #: today and the six UTC days before it
    last_7_days: Totals
    total: Totals
    per_job: Mapping[str, Totals] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def t(x: Totals) -> dict[str, int]:
            return {"units": x.units, "amount": x.amount}

        return {
            "account": self.account,
            "kind": self.kind.value,
            "day": self.day,
            "today": t(self.today),
            "last_7_days": t(self.last_7_days),
            "total": t(self.total),
            "per_job": {job: t(x) for job, x in self.per_job.items()},
        }


def day_start_us(now: float) -> int:
    """Microseconds since the epoch at 00:00 UTC of the day ``now`` (epoch seconds) falls in."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(day.timestamp()) * 1_000_000


class Ledger:
    """The append-only ledger in one SQLite file."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time, busy_timeout: float = 30.0) -> None:
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                log.warning("ledger %s: SQLite refused WAL (journal mode %s)", self.path, mode)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------

    def append(self, entry: Entry) -> Row:
        """Append one row in its own transaction (on disk when this returns)."""
        return self.append_many([entry])[0]

    def append_many(self, entries: Sequence[Entry]) -> list[Row]:
        """Append rows in ONE transaction: all of them are stored, or (on any error) none."""
        if not entries:
            return []
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    rows = self._seal_after_head(entries)
                    self._db.executemany(_INSERT, [r.values() for r in rows])
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot append to ledger {self.path}: {exc}") from None
        return rows

    def _seal_after_head(self, entries: Sequence[Entry]) -> list[Row]:
        head = self._db.execute("SELECT id, time, row_hash FROM ledger ORDER BY id DESC LIMIT 1").fetchone()
        last_id, last_time, prev_hash = head if head is not None else (0, 0, GENESIS_HASH)
        # never earlier than the last row, so id order is time order even if the clock steps back
        now_us = max(int(self._clock() * 1_000_000), int(last_time))
        rows = []
        for i, entry in enumerate(entries, start=int(last_id) + 1):
            row = seal(i, now_us, entry, str(prev_hash))
            rows.append(row)
            prev_hash = row.row_hash
        return rows

    # -- reading ---------------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(id, row_hash) of the last row, (0, GENESIS_HASH) when empty: publish it to catch rewrites."""
        with self._lock:
            row = self._db.execute("SELECT id, row_hash FROM ledger ORDER BY id DESC LIMIT 1").fetchone()
        return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])

    def rows(self) -> list[Row]:
        with self._lock:
            return [Row(*r) for r in self._db.execute(f"{_SELECT} ORDER BY id")]

    def receipts(self, kind: Kind = Kind.CREDIT) -> Iterator[str]:
        """The receipt JSON of every row of ``kind`` that has one, oldest first (to rebuild credit state)."""
        with self._lock:
            found = self._db.execute(
                "SELECT receipt FROM ledger WHERE kind = ? AND receipt != '' ORDER BY id", (kind.value,)
            )
            receipts = [str(r[0]) for r in found]
        return iter(receipts)

    def job_rows(self, job_id: str) -> list[Row]:
        """Every row of one job, oldest first."""
        with self._lock:
            return [Row(*r) for r in self._db.execute(f"{_SELECT} WHERE job_id = ? ORDER BY id", (job_id,))]

    def verify(self) -> VerifyResult:
        with self._lock:
            return _verify_connection(self._db)

    def earnings(self, account: str, *, now: float | None = None) -> Statement:
        """A supplier's credits: today, last 7 days, total and per job."""
        return self.statement(account, Kind.CREDIT, now=now)

    def spend(self, account: str, *, now: float | None = None) -> Statement:
        """A developer's debits, in the same shape as :meth:`earnings`."""
        return self.statement(account, Kind.DEBIT, now=now)

    def statement(self, account: str, kind: Kind, *, now: float | None = None) -> Statement:
        with self._lock:
            return _statement(self._db, account, kind, self._clock() if now is None else now)


def verify(db: Path | str) -> VerifyResult:
    """Walk the chain of the ledger file ``db`` (opened read-only) and name its first broken row.

    A missing file, or one that is not a ledger, is a :class:`LedgerError` (never created here).
    """
    conn = _open_existing(db)
    try:
        return _verify_connection(conn)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read ledger {db}: {exc}") from None
    finally:
        conn.close()


def statement(db: Path | str, account: str, kind: Kind, *, now: float | None = None) -> Statement:
    """:meth:`Ledger.statement` on an existing ledger file, opened read-only."""
    conn = _open_existing(db)
    try:
        return _statement(conn, account, kind, time.time() if now is None else now)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read ledger {db}: {exc}") from None
    finally:
        conn.close()


def _open_existing(db: Path | str) -> sqlite3.Connection:
    path = Path(db)
    if not path.is_file():
        raise LedgerError(f"no ledger database at {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ledger'").fetchone()
        except sqlite3.Error:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc}") from None
    if found is None:
        conn.close()
        raise LedgerError(f"{path} is not a ledger (no ledger table)")
    return conn


def _verify_connection(conn: sqlite3.Connection) -> VerifyResult:
    # one read transaction: the rows and sqlite_sequence are one snapshot even while others append
    conn.execute("BEGIN")
    try:
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'ledger'").fetchone()
        highest = int(seq[0]) if seq is not None and type(seq[0]) is int else 0
        return verify_rows(conn.execute(f"{_SELECT} ORDER BY id"), highest_id_used=highest)
    finally:
        conn.execute("COMMIT")


def _statement(conn: sqlite3.Connection, account: str, kind: Kind, now: float) -> Statement:
    """``kind``'s totals for ``account``, net of its offsetting kind (``OFFSETS``: clawbacks, refunds)."""
    today = day_start_us(now)
    week = today - 6 * _DAY_US
    offset = OFFSETS.get(kind, kind).value
    signed = "(CASE WHEN kind = ? THEN {0} ELSE -{0} END)"
    since = f"COALESCE(SUM(CASE WHEN time >= ? THEN {signed} END), 0)"
    total = f"COALESCE(SUM({signed}), 0)"
    k = kind.value
    row = conn.execute(
        f"SELECT {since.format('units')}, {since.format('amount')}, {since.format('units')}, {since.format('amount')},"
        f" {total.format('units')}, {total.format('amount')} FROM ledger WHERE account = ? AND kind IN (?, ?)",
        (today, k, today, k, week, k, week, k, k, k, account, k, offset),
    ).fetchone()
    per_job = {
        str(job): Totals(int(u), int(a))
        for job, u, a in conn.execute(
            f"SELECT job_id, SUM({signed.format('units')}), SUM({signed.format('amount')}) FROM ledger"
            " WHERE account = ? AND kind IN (?, ?) AND job_id != '' GROUP BY job_id ORDER BY MIN(id)",
            (k, k, account, k, offset),
        )
    }
    return Statement(
        account=account,
        kind=kind,
        day=(datetime.fromtimestamp(now, UTC).date()).isoformat(),
        today=Totals(int(row[0]), int(row[1])),
        last_7_days=Totals(int(row[2]), int(row[3])),
        total=Totals(int(row[4]), int(row[5])),
        per_job=per_job,
    )
