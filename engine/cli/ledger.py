"""``kluster ledger``: check the ledger's hash chain and read statements from it.

  verify    recompute every row's hash; "ledger ok: N rows", or "ledger broken at row K: why" (exit 1)
  earnings  a supplier's credits today (UTC), over the last 7 days, in total and per job
  spend     a developer's debits, in the same shape

The ledger file is opened read-only and never created: a wrong path is a one-line error, not an
empty new ledger that verifies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("ledger", help="verify the ledger's hash chain; show earnings and spend")
    cmds = p.add_subparsers(dest="ledger_command", required=True, metavar="LEDGER_COMMAND")

    v = cmds.add_parser("verify", help="recompute the hash chain and name the first edited/deleted/reordered row")
    v.add_argument("--db", type=Path, required=True, help="the ledger's SQLite file")
    v.set_defaults(handler=run_verify)

    for name, what in (("earnings", "a supplier's credits"), ("spend", "a developer's debits")):
        s = cmds.add_parser(name, help=f"{what}: today (UTC), last 7 days, total, per job")
        s.add_argument("--db", type=Path, required=True, help="the ledger's SQLite file")
        s.add_argument("--account", required=True, help="supplier peer id / name, or developer (tenant) name")
        s.add_argument("--json", action="store_true", help="print one JSON object (amounts in integer micro-units)")
        s.set_defaults(handler=run_statement, statement=name)


def run_verify(args: argparse.Namespace) -> int:
    from engine.ledger.store import verify

    result = verify(args.db)
    if result.ok:
        print(f"ledger ok: {result.rows} rows")
        return 0
    print(f"ledger broken at row {result.broken_at}: {result.reason}")
    return 1


def run_statement(args: argparse.Namespace) -> int:
    from engine.ledger.chain import Kind
    from engine.ledger.store import statement

    kind = Kind.CREDIT if args.statement == "earnings" else Kind.DEBIT
    st = statement(args.db, args.account, kind)
    if args.json:
        print(json.dumps(st.to_dict(), sort_keys=True))
        return 0
    print(f"{args.statement} of {st.account} (UTC day {st.day})")
    print(f"  {'':<14}{'units':>16}{'amount':>20}")
    for label, totals in (("today", st.today), ("last 7 days", st.last_7_days), ("total", st.total)):
        print(f"  {label:<14}{totals.units:>16,}{money(totals.amount):>20}")
    if st.per_job:
        print("  per job:")
    for job, totals in st.per_job.items():
        print(f"    {job:<12}{totals.units:>16,}{money(totals.amount):>20}")
    return 0


def money(micro: int) -> str:
    """Integer micro-units as a decimal amount with six places (no float on the way)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole:,}.{frac:06d}"
