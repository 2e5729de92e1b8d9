"""Earnings arithmetic for the dashboard: formatting micro-units, the daily history, a prediction.

The coordinator's ``/v1/earnings`` gives today / last 7 days / total but no per-day series, so
the app keeps its own: the highest "today" it saw for each day (``earnings_history.json`` in the
config folder). The chart draws that; days the app did not run show as gaps, never as invented
values. Pure functions, apart from the small load/save of that file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MICRO = 1_000_000
HISTORY_FILE = "earnings_history.json"
KEEP_DAYS = 90


def format_amount(micro: int) -> str:
    """Integer micro-units as a decimal with up to 6 places (amounts per job are often tiny)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole:,}.{digits}"


def utc_day(now: float) -> str:
    """The ledger counts "today" in UTC days; the history uses the same days."""
    return dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()


def record(history: dict[str, int], day: str, today_amount: int) -> dict[str, int]:
    """``history`` with ``day`` raised to ``today_amount`` (never lowered), trimmed to KEEP_DAYS."""
    out = dict(history)
    out[day] = max(out.get(day, 0), today_amount)
    for old in sorted(out)[:-KEEP_DAYS]:
        del out[old]
    return out


def last_days(history: dict[str, int], today: str, n: int = 7) -> list[tuple[str, int | None]]:
    """(day, amount or None when unknown) for the ``n`` days ending ``today``, oldest first."""
    end = dt.date.fromisoformat(today)
    days = [(end - dt.timedelta(days=k)).isoformat() for k in range(n - 1, -1, -1)]
    return [(d, history.get(d)) for d in days]


@dataclass(frozen=True)
class Prediction:
    per_day: int
    per_month: int
    #: how many days the rate is averaged over
    days: int


def predict(last_7_days_amount: int, history: dict[str, int], today: str) -> Prediction:
    """At the last 7 days' rate: averaged over the days since earnings were first seen (1-7)."""
    known = [d for d, a in last_days(history, today) if a]
    first = known[0] if known else today
    days = min(7, (dt.date.fromisoformat(today) - dt.date.fromisoformat(first)).days + 1)
    per_day = last_7_days_amount // max(days, 1)
    return Prediction(per_day, per_day * 30, days)


def load_history(folder: Path) -> dict[str, int]:
    try:
        raw = json.loads((folder / HISTORY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the earnings history (%s)", exc)
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if type(v) is int and v >= 0}


def save_history(folder: Path, history: dict[str, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (HISTORY_FILE + ".tmp")
    tmp.write_text(json.dumps(history, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / HISTORY_FILE)
