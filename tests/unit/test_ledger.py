"""The hash-chained ledger: tamper evidence through ``kluster ledger verify``, crash safety, statements."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.cli import main
from engine.ledger.chain import COLUMNS, GENESIS_HASH, Entry, Kind
from engine.ledger.pricing import Pricing
from engine.ledger.store import Ledger, LedgerError, day_start_us, verify

ROOT = Path(__file__).resolve().parents[2]
ROWS = 12
NOON = datetime(2026, 5, 20, 12, 0, tzinfo=UTC).timestamp()
DAY = 86_400.0


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _entry(i: int) -> Entry:
    kind = [Kind.CREDIT, Kind.DEBIT, Kind.PAYOUT][i % 3]
    return Entry(kind, f"acct-{i % 4}", f"job-{i % 5}", "smollm2-135m", 10 * i + 1, 7 * i + 3, json.dumps({"i": i}))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger(path, clock=Clock(NOON)) as ledger:
        for i in range(ROWS):
            ledger.append(_entry(i))
    return path


def _sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for s in statements:
            conn.execute(s)
    conn.close()


def _cli_verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["ledger", "verify", "--db", str(path)])
    out = capsys.readouterr()
    return rc, (out.out + out.err).strip()


def test_an_untouched_ledger_verifies(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli_verify(db, capsys) == (0, f"ledger ok: {ROWS} rows")
    result = verify(db)
    assert result.ok and result.rows == ROWS and result.head[0] == ROWS


_EDITS = {
    "id": "id = id + 1000",
    "time": "time = time + 1",
    "kind": "kind = CASE kind WHEN 'credit' THEN 'debit' ELSE 'credit' END",
    "account": "account = account || 'x'",
    "job_id": "job_id = 'job-other'",
    "model": "model = 'llama-70b'",
    "units": "units = units + 1",
    "amount": "amount = amount * 10",
    "receipt": "receipt = ''",
    "prev_hash": "prev_hash = (CASE WHEN prev_hash LIKE 'f%' THEN 'e' ELSE 'f' END) || substr(prev_hash, 2)",
    "row_hash": "row_hash = (CASE WHEN row_hash LIKE 'f%' THEN 'e' ELSE 'f' END) || substr(row_hash, 2)",
}
assert set(_EDITS) == set(COLUMNS)


@pytest.mark.parametrize("row", [1, 6, ROWS])
@pytest.mark.parametrize("column", COLUMNS)
def test_editing_any_column_of_any_row_is_named_by_verify(
    db: Path, capsys: pytest.CaptureFixture[str], column: str, row: int
) -> None:
    _sql(db, f"UPDATE ledger SET {_EDITS[column]} WHERE id = {row}")
    rc, out = _cli_verify(db, capsys)
    assert rc == 1
    assert out.startswith(f"ledger broken at row {row}: "), out


@pytest.mark.parametrize(("column", "value"), [("units", "'ten'"), ("amount", "1.5"), ("account", "x'00'")])
def test_a_value_of_the_wrong_type_is_named(
    db: Path, capsys: pytest.CaptureFixture[str], column: str, value: str
) -> None:
    _sql(db, f"UPDATE ledger SET {column} = {value} WHERE id = 4")
    rc, out = _cli_verify(db, capsys)
    assert (rc, out) == (1, f"ledger broken at row 4: column {column} has the wrong type (edited)")


@pytest.mark.parametrize("row", [1, 2, 7, ROWS])
def test_deleting_a_row_is_named_by_verify(db: Path, capsys: pytest.CaptureFixture[str], row: int) -> None:
    _sql(db, f"DELETE FROM ledger WHERE id = {row}")
    rc, out = _cli_verify(db, capsys)
    assert rc == 1
    assert out.startswith(f"ledger broken at row {row}: ") and "missing" in out, out


def test_deleting_several_rows_names_the_first(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sql(db, "DELETE FROM ledger WHERE id IN (5, 6, 9)")
    assert _cli_verify(db, capsys) == (1, "ledger broken at row 5: rows 5-6 are missing (deleted, or renumbered)")


_NON_ID = [c for c in COLUMNS if c != "id"]


@pytest.mark.parametrize(("a", "b"), [(2, 3), (1, ROWS), (5, 9)])
def test_swapping_two_rows_is_named_by_verify(db: Path, capsys: pytest.CaptureFixture[str], a: int, b: int) -> None:
    # swap the rows' contents, ids staying in place: the order of rows changes
    sets = ", ".join(f"{c} = (SELECT {c} FROM ledger AS o WHERE o.id = {a} + {b} - ledger.id)" for c in _NON_ID)
    _sql(db, f"UPDATE ledger SET {sets} WHERE id IN ({a}, {b})")
    rc, out = _cli_verify(db, capsys)
    assert rc == 1
    assert out.startswith(f"ledger broken at row {min(a, b)}: "), out


def test_renumbering_two_rows_is_named_by_verify(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sql(
        db,
        "UPDATE ledger SET id = -1 WHERE id = 8",
        "UPDATE ledger SET id = 8 WHERE id = 4",
        "UPDATE ledger SET id = 4 WHERE id = -1",
    )
    rc, out = _cli_verify(db, capsys)
    assert rc == 1 and out.startswith("ledger broken at row 4: "), out


def test_a_rewritten_row_breaks_the_link_to_the_next(db: Path) -> None:
    # an editor who also recomputes the edited row's own hash is caught at the following row
    from engine.ledger.chain import hash_fields

    conn = sqlite3.connect(db)
    row = list(conn.execute("SELECT * FROM ledger WHERE id = 3").fetchone())
    row[7] += 1_000_000  # amount
    row[-1] = hash_fields(row[:-1])
    with conn:
        conn.execute("UPDATE ledger SET amount = ?, row_hash = ? WHERE id = 3", (row[7], row[-1]))
    conn.close()
    result = verify(db)
    assert (result.ok, result.broken_at, result.rows) == (False, 4, 3)
    assert "does not follow" in result.reason


def test_verify_through_the_real_command(db: Path) -> None:
    _sql(db, "UPDATE ledger SET amount = amount + 1 WHERE id = 9")
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "ledger", "verify", "--db", str(db)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == "ledger broken at row 9: its contents do not match its hash (edited)"


def test_missing_or_foreign_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.db"
    rc, out = _cli_verify(missing, capsys)
    assert (rc, out) == (2, f"kluster: error: no ledger database at {missing}")
    assert not missing.exists()  # never created
    other = tmp_path / "other.db"
    _sql(other, "CREATE TABLE t (x)")
    rc, out = _cli_verify(other, capsys)
    assert rc == 2 and out == f"kluster: error: {other} is not a ledger (no ledger table)"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    rc, out = _cli_verify(garbage, capsys)
    assert rc == 2 and out.startswith("kluster: error: ") and "\n" not in out
    empty = tmp_path / "empty.db"
    Ledger(empty).close()
    assert _cli_verify(empty, capsys) == (0, "ledger ok: 0 rows")


def test_rows_chain_from_genesis_and_a_batch_is_one_transaction(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db", clock=Clock(NOON))
    rows = ledger.append_many([_entry(i) for i in range(3)])
    assert [r.id for r in rows] == [1, 2, 3]
    assert rows[0].prev_hash == GENESIS_HASH
    assert [r.prev_hash for r in rows[1:]] == [r.row_hash for r in rows[:-1]]
    assert ledger.head() == (3, rows[-1].row_hash)

    bad = [_entry(3), object()]  # the second is unusable: nothing of the batch may land
    with pytest.raises(Exception):  # noqa: B017 - any failure must roll the whole batch back
        ledger.append_many(bad)  # type: ignore[arg-type]
    assert ledger.count() == 3 and ledger.verify().ok
    ledger.close()


def test_entries_refuse_floats_negative_amounts_and_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="amount"):
        Entry(Kind.CREDIT, "a", "j", "m", 1, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="amount"):
        Entry(Kind.CREDIT, "a", "j", "m", 1, -1)
    with pytest.raises(ValueError, match="units"):
        Entry(Kind.CREDIT, "a", "j", "m", True, 1)
    with pytest.raises(ValueError, match="kind"):
        Entry("bonus", "a", "j", "m", 1, 1)  # type: ignore[arg-type]


def test_time_never_goes_backwards(tmp_path: Path) -> None:
    clock = Clock(NOON)
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        first = ledger.append(_entry(0))
        clock.now -= 3600  # the wall clock stepped back
        second = ledger.append(_entry(1))
        assert second.time == first.time == int(NOON * 1_000_000)


# -- kill -9 while appending ----------------------------------------------------------------------

_APPENDER = """
import sys
from engine.ledger.chain import Entry, Kind
from engine.ledger.store import Ledger

ledger = Ledger(sys.argv[1])
start = ledger.count()
for i in range(start, start + int(sys.argv[2])):
    ledger.append(Entry(Kind.CREDIT, f"n-{i % 7}", f"job-{i % 13}", "m", i + 1, 3 * i + 1, '{"r": %d}' % i))
"""


def _count(path: Path) -> int:
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet
        return 0
    finally:
        conn.close()


def _crash_appender(path: Path) -> tuple[int, int]:
    """Start appending 10,000 rows to ``path`` in a subprocess and SIGKILL it at a random moment
    after ``target`` rows; returns (seed, target)."""
    seed = random.randrange(2**32)
    target = random.Random(seed).randint(100, 4000)
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), "10000"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while _count(path) < target:
            assert proc.poll() is None, f"appender exited early ({proc.returncode}); seed {seed}"
            assert time.monotonic() < deadline, f"appender too slow; seed {seed}"
            time.sleep(0.002)
        still_running = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert still_running, f"the appender finished before the kill; seed {seed}"
    assert proc.returncode == -signal.SIGKILL
    return seed, target


@pytest.mark.slow
def test_kill_9_during_10000_appends_leaves_a_valid_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    seed, target = _crash_appender(path)
    result = verify(path)  # every row whole and chained: no partial row
    assert result.ok, f"{result}; seed {seed}"
    assert 1 <= target <= result.rows < 10_000, f"seed {seed}"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = [r[0] for r in conn.execute("SELECT id FROM ledger ORDER BY id")]
    last = conn.execute("SELECT units, amount, receipt FROM ledger ORDER BY id DESC LIMIT 1").fetchone()
    conn.close()
    assert ids == list(range(1, result.rows + 1))
    n = result.rows - 1  # the last row is the appender's row n, complete in every field
    assert last == (n + 1, 3 * n + 1, json.dumps({"r": n}))


@pytest.mark.slow
def test_appending_continues_on_the_same_chain_after_a_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    seed, _ = _crash_appender(path)
    before = verify(path)
    with Ledger(path) as ledger:
        more = ledger.append_many([_entry(i) for i in range(5)])
        one = ledger.append(_entry(5))
    assert [r.id for r in [*more, one]] == list(range(before.rows + 1, before.rows + 7)), f"seed {seed}"
    assert more[0].prev_hash == before.head[1] and one.prev_hash == more[-1].row_hash
    after = verify(path)
    assert after.ok and after.rows == before.rows + 6 and after.head == (one.id, one.row_hash), f"seed {seed}"
    # and another process picks up where the crashed one stopped
    subprocess.run([sys.executable, "-c", _APPENDER, str(path), "20"], cwd=ROOT, check=True, timeout=60)
    assert verify(path).rows == before.rows + 26


def test_two_processes_appending_at_once_never_fork_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), "150"], cwd=ROOT) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    result = verify(path)
    assert result.ok and result.rows == 300


# -- statements -----------------------------------------------------------------------------------


def test_earnings_and_spend_today_last_7_days_total_and_per_job(tmp_path: Path) -> None:
    pricing = Pricing(default=1_000_000, prices={"big": 30_000_000})  # micro-units per million tokens
    clock = Clock(NOON)
    ledger = Ledger(tmp_path / "l.db", clock=clock)

    def earn(days_ago: float, job: str, model: str, layers: int, units: int) -> int:
        clock.now = NOON - days_ago * DAY
        amount = pricing.amount(model, layers, units)
        ledger.append_many(
            [
                Entry(Kind.CREDIT, "n-supplier", job, model, units, amount),
                Entry(Kind.DEBIT, "alice", job, model, units, amount),
            ]
        )
        return amount

    a_old = earn(30, "job-a", "small", 30, 3_000_000)  # 100,000 tokens of a 30-layer model: 0.1 -> 100,000 micro
    b_7d = earn(6.6, "job-b", "big", 10, 500_000)  # 7 days ago at 21:36 UTC: outside
    b_6d = earn(6.4, "job-b", "big", 10, 1_000_000)  # 6 days + 9.6 h ago: still inside the 7 UTC days
    c_yday = earn(0.51, "job-c", "small", 30, 60)  # yesterday 23:45 UTC: 2 tokens, 2 micro-units
    c_today = earn(0.49, "job-c", "small", 30, 6_000_000)  # today 00:14 UTC
    ledger.append(Entry(Kind.CREDIT, "n-other", "job-c", "small", 999, 999))  # someone else's
    ledger.append(Entry(Kind.PAYOUT, "n-supplier", "", "", 0, 50))  # not earnings

    assert (a_old, b_6d, b_7d, c_yday, c_today) == (100_000, 3_000_000, 1_500_000, 2, 200_000)
    clock.now = NOON
    st = ledger.earnings("n-supplier")
    assert st.day == "2026-05-20"
    assert (st.today.units, st.today.amount) == (6_000_000, 200_000)
    assert (st.last_7_days.units, st.last_7_days.amount) == (1_000_000 + 60 + 6_000_000, 3_200_002)
    assert (st.total.units, st.total.amount) == (3_000_000 + 1_500_000 + 6_000_060, 4_800_002)
    assert {job: (t.units, t.amount) for job, t in st.per_job.items()} == {
        "job-a": (3_000_000, 100_000),
        "job-b": (1_500_000, 4_500_000),
        "job-c": (6_000_060, 200_002),
    }
    spend = ledger.spend("alice")
    assert (spend.kind, spend.total, spend.per_job) == (Kind.DEBIT, st.total, st.per_job)
    # an hour later it is the next UTC day: "today" is empty, the oldest day drops out of the 7
    tomorrow = ledger.earnings("n-supplier", now=NOON + 12.5 * 3600)
    assert tomorrow.day == "2026-05-21" and tomorrow.today.units == 0
    assert tomorrow.last_7_days.units == 6_000_060
    ledger.close()


def test_earnings_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        ledger.append(Entry(Kind.CREDIT, "n-supplier", "job-a", "m", 40, 1_234_567))
    assert main(["ledger", "earnings", "--db", str(path), "--account", "n-supplier", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == data["today"] == {"units": 40, "amount": 1_234_567}
    assert data["per_job"] == {"job-a": {"units": 40, "amount": 1_234_567}}
    assert main(["ledger", "earnings", "--db", str(path), "--account", "n-supplier"]) == 0
    text = capsys.readouterr().out
    assert "1.234567" in text and "job-a" in text
    assert main(["ledger", "spend", "--db", str(path), "--account", "nobody", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == {"units": 0, "amount": 0}


def test_day_boundaries_are_utc() -> None:
    assert day_start_us(NOON) == int(datetime(2026, 5, 20, tzinfo=UTC).timestamp()) * 1_000_000
    assert day_start_us(NOON - 12 * 3600) == day_start_us(NOON)
    assert day_start_us(NOON - 12 * 3600 - 1e-3) == day_start_us(NOON) - 86_400 * 1_000_000


def test_pricing_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"default": 100000, "big": 2000000}')
    pricing = Pricing.load(path)
    assert (pricing.price("big"), pricing.price("small")) == (2_000_000, 100_000)
    from engine.errors import ConfigError

    for bad in ('{"big": 1}', '{"default": 0.5}', '{"default": 1, "x": -1}', "[1]", "nope"):
        path.write_text(bad)
        with pytest.raises(ConfigError):
            Pricing.load(path)


def test_ledger_receipts_feed_credit_state(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.append(Entry(Kind.CREDIT, "n-x", "j", "m", 1, 1, "r1"))
        ledger.append(Entry(Kind.DEBIT, "alice", "j", "m", 1, 1, "r1"))
        ledger.append(Entry(Kind.CREDIT, "n-x", "j", "m", 1, 1, ""))
        assert list(ledger.receipts()) == ["r1"]


def test_ledger_open_errors_are_ledger_errors(tmp_path: Path) -> None:
    with pytest.raises(LedgerError):
        Ledger(tmp_path / "no-such-dir" / "l.db")
