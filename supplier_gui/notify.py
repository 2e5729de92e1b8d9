"""When to pop a notification: the first earnings of a day, and errors (not every retry of one).

Pure decisions on small state records; the app shows them with ``QSystemTrayIcon.showMessage``.
A crash loop must not flood the desktop: the same error is announced once per ERROR_REPEAT_S.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

ERROR_REPEAT_S = 600.0


@dataclass(frozen=True)
class NotifyState:
    #: the day (``earnings.utc_day``) whose first earnings were announced
    earnings_day: str = ""
    #: error message -> when it was last announced
    errors: dict[str, float] = field(default_factory=dict)


def first_earnings(state: NotifyState, day: str, today_amount: int) -> tuple[bool, NotifyState]:
    """Announce when today's earnings become positive, once per day."""
    if today_amount > 0 and state.earnings_day != day:
        return True, replace(state, earnings_day=day)
    return False, state


def error(state: NotifyState, message: str, now: float) -> tuple[bool, NotifyState]:
    """Announce an error unless the same one was announced in the last ERROR_REPEAT_S."""
    last = state.errors.get(message)
    if last is not None and now - last < ERROR_REPEAT_S:
        return False, state
    recent = {m: t for m, t in state.errors.items() if now - t < ERROR_REPEAT_S}
    return True, replace(state, errors={**recent, message: now})
