"""What the tray shows and whether the node should run: one pure function of the inputs.

Everything that decides sharing (the user's tick, a pause, idle and full-screen rules, sign-in,
the node process and its events) is gathered into ``Inputs``; ``decide`` returns the icon state,
whether the node should be running, and one line saying why. No Qt here, so every rule is a plain
unit test, and the app is a loop: gather inputs, decide, make the world match.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass


class TrayState(enum.Enum):
    #: not sharing (unticked, or not signed in)
    IDLE = "idle"
    #: the node runs (starting, loading or ready) and serves no session right now
    SHARING = "sharing"
    #: at least one developer's session runs through this node
    SERVING = "serving"
    #: sharing is on but held back: paused for a while, not idle long enough, a full-screen app
    PAUSED = "paused"
    #: the node crashed or cannot start; the supervisor retries with backoff
    ERROR = "error"


@dataclass(frozen=True)
class Inputs:
    signed_in: bool
    #: the "Share GPU" tick
    share: bool
    now: float
    #: "Pause for 1 hour" until this time (time.time()), or None
    paused_until: float | None = None
    #: share only after this many seconds of user inactivity (0: off)
    idle_required_s: float = 0.0
    #: seconds since the last user input; None: cannot be measured on this platform
    idle_s: float | None = None
    pause_fullscreen: bool = False
    #: a full-screen application is in front; None: cannot be detected on this platform
    fullscreen: bool | None = None
    #: the supervisor's process state (supervisor.ProcState value)
    process: str = "stopped"
    #: the node's phase from its events (nodeview.NodeView.phase)
    phase: str = ""
    sessions: int = 0
    #: a failure to show (a crash while restarting, or an error the running node reported)
    error: str = ""


@dataclass(frozen=True)
class Decision:
    state: TrayState
    #: whether the node process should be running
    run: bool
    #: one line for the tooltip and the dashboard
    reason: str


def _hold(i: Inputs) -> str | None:
    """Why sharing is held back right now, or None."""
    if i.paused_until is not None and i.now < i.paused_until:
        return f"paused until {time.strftime('%H:%M', time.localtime(i.paused_until))}"
    if i.idle_required_s > 0 and i.idle_s is not None and i.idle_s < i.idle_required_s:
        return f"waiting until the computer has been idle for {i.idle_required_s / 60:.0f} min"
    if i.pause_fullscreen and i.fullscreen:
        return "paused while a full-screen application runs"
    return None


def decide(i: Inputs) -> Decision:
    if not i.signed_in:
        return Decision(TrayState.IDLE, False, "sign in to share your GPU")
    if not i.share:
        if i.process == "stopping":
            return Decision(TrayState.IDLE, False, "not sharing: finishing the sessions in progress")
        return Decision(TrayState.IDLE, False, "not sharing")
    hold = _hold(i)
    if hold is not None:
        if i.process == "stopping":
            hold += "; finishing the sessions in progress"
        return Decision(TrayState.PAUSED, False, hold)
    if i.process == "backoff" or i.error:
        return Decision(TrayState.ERROR, True, i.error or "the node stopped; restarting it")
    if i.sessions > 0:
        plural = "s" if i.sessions != 1 else ""
        return Decision(TrayState.SERVING, True, f"serving {i.sessions} session{plural}")
    if i.process == "starting":
        return Decision(TrayState.SHARING, True, "starting the node")
    if i.phase in ("registered", "assigned"):
        what = "loading its fragments" if i.phase == "assigned" else "measuring this computer"
        return Decision(TrayState.SHARING, True, f"sharing: {what}")
    if i.phase == "ready":
        return Decision(TrayState.SHARING, True, "sharing: ready for requests")
    return Decision(TrayState.SHARING, True, "sharing")
