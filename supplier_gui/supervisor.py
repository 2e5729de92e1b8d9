"""The node as a supervised child process: started, watched, drained, restarted with backoff.

Why a process and not a thread: the node loads torch and runs untrusted-size workloads; if it
crashes (or is OOM-killed) the tray must live on, show the error and try again. Events come back
as JSON lines on the child's stdout (``kluster node --events-jsonl -``, engine.node.events); its
log goes to stderr, whose last lines are kept to explain a crash.

Stopping is a drain: SIGTERM makes the node refuse new sessions and finish live ones
(``--drain-timeout``); only if it is still alive ``kill_after_s`` later is it killed.
The restart policy is ``backoff_delay``, a pure function tested on its own.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

log = logging.getLogger(__name__)

#: a run that lasted this long before crashing resets the failure count (it was a new failure)
STABLE_S = 60.0


def backoff_delay(failures: int, rnd: float = 0.5, *, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Seconds to wait before restart number ``failures`` (1 = the first crash): doubling, capped, +-10%.

    ``rnd`` in [0, 1) spreads restarts so that many suppliers whose nodes all failed at one
    coordinator outage do not all come back in the same second; 0.5 means no spread.
    """
    if failures <= 0:
        return 0.0
    delay = min(cap_s, base_s * 2.0 ** min(failures - 1, 30))
    return delay * (0.9 + 0.2 * min(max(rnd, 0.0), 1.0))


class ProcState(enum.Enum):
    STOPPED = "stopped"
    #: started, not yet registered with the coordinator
    STARTING = "starting"
    RUNNING = "running"
    #: asked to stop: draining its live sessions
    STOPPING = "stopping"
    #: crashed; waiting ``backoff_delay`` before the next start
    BACKOFF = "backoff"


@dataclass(frozen=True)
class Launch:
    """What to start: argv and extra environment (the token travels here, never in argv)."""

    argv: list[str]
    #: variables to set; None removes one (e.g. a $KLUSTER_TOKEN inherited from the user's shell)
    env: dict[str, str | None]


class NodeSupervisor(QObject):
    """Keeps one node process running while ``wanted``; see the module docstring."""

    #: one parsed event line of the node (a dict with "event")
    event = Signal(dict)
    #: the process state or the error changed
    changed = Signal()
    #: the node died while wanted: the error message (the tray notifies)
    crashed = Signal(str)

    def __init__(
        self,
        launch: Callable[[], Launch],
        *,
        kill_after_s: float = 75.0,
        backoff: Callable[[int], float] | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._launch = launch
        self.kill_after_s = kill_after_s
        self._backoff = backoff or (lambda n: backoff_delay(n, random.random()))
        self.state = ProcState.STOPPED
        self.wanted = False
        self.failures = 0
        self.restarts = 0
        self.last_error = ""
        self.started_at: float | None = None
        self.next_start_at: float | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._proc: QProcess | None = None
        self._stdout_buf = b""
        self._stderr_buf = b""
        self._restart_timer = QTimer(self, singleShot=True)
        self._restart_timer.timeout.connect(self._start_process)
        self._kill_timer = QTimer(self, singleShot=True)
        self._kill_timer.timeout.connect(self._kill)

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Want the node running: start it now unless it already runs (or is waiting to restart)."""
        self.wanted = True
        if self.state is ProcState.STOPPED:
            self.failures = 0
            self._start_process()
        elif self.state is ProcState.STOPPING:
            pass  # _finished starts it again once the drain is over
        self.changed.emit()

    def stop(self) -> None:
        """Want it stopped: drain a running node (SIGTERM), cancel a pending restart."""
        self.wanted = False
        self._restart_timer.stop()
        self.next_start_at = None
        if self._proc is not None and self.state in (ProcState.STARTING, ProcState.RUNNING):
            self.state = ProcState.STOPPING
            log.info("asking the node to drain (SIGTERM)")
            self._proc.terminate()
            self._kill_timer.start(int(self.kill_after_s * 1000))
        elif self._proc is None:
            self.state = ProcState.STOPPED
        self.changed.emit()

    def restart(self) -> None:
        """Drain the running node and start a new one (new settings); a stopped one just starts."""
        was_running = self._proc is not None
        self.stop()
        if was_running:
            self.wanted = True  # _finished starts the new process once the drain is over
            self.changed.emit()
        else:
            self.start()

    def kill_now(self) -> None:
        """Stop without draining (Quit while a drain runs, or tests)."""
        self.wanted = False
        self._restart_timer.stop()
        self._kill()

    def wait_stopped(self, timeout_s: float) -> bool:
        """Block until the process is gone (at application exit only)."""
        proc = self._proc
        return proc is None or proc.waitForFinished(int(timeout_s * 1000))

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.processId()) or None

    def uptime_s(self) -> float | None:
        return None if self.started_at is None else time.monotonic() - self.started_at

    # ------------------------------------------------------------------ the process

    def _start_process(self) -> None:
        if self._proc is not None or not self.wanted:
            return
        self.next_start_at = None
        try:
            launch = self._launch()
        except Exception as exc:  # a settings problem: shown like a crash, retried with backoff
            self._died(f"cannot start the node: {exc}")
            return
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        for k, v in launch.env.items():
            if v is None:
                env.remove(k)
            else:
                env.insert(k, v)
        proc.setProcessEnvironment(env)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._error)
        self._proc = proc
        self._stdout_buf = self._stderr_buf = b""
        self.state = ProcState.STARTING
        self.started_at = time.monotonic()
        log.info("starting the node: %s", " ".join(launch.argv))
        proc.start(launch.argv[0], launch.argv[1:])
        self.changed.emit()

    def _read_stdout(self) -> None:
        if self._proc is None:
            return
        self._stdout_buf += bytes(self._proc.readAllStandardOutput().data())
        *lines, self._stdout_buf = self._stdout_buf.split(b"\n")
        for raw in lines:
            self._on_line(raw.decode("utf-8", "replace").strip())

    def _on_line(self, line: str) -> None:
        if not line:
            return
        try:
            ev = json.loads(line)
        except ValueError:
            log.debug("node stdout: %s", line)
            return
        if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
            return
        kind = ev["event"]
        if kind == "registered" and self.state is ProcState.STARTING:
            self.state = ProcState.RUNNING
        elif kind == "ready" and self.state is ProcState.RUNNING:
            self.failures = 0  # it got all the way to serving: the next crash starts the backoff afresh
        elif kind == "error":
            self.last_error = str(ev.get("message", "error"))
        self.event.emit(ev)
        self.changed.emit()

    def _read_stderr(self) -> None:
        if self._proc is None:
            return
        self._stderr_buf += bytes(self._proc.readAllStandardError().data())
        *lines, self._stderr_buf = self._stderr_buf.split(b"\n")
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip()
            if text:
                self.stderr_tail.append(text)
                log.debug("node: %s", text)

    def _crash_reason(self, code: int, status: QProcess.ExitStatus) -> str:
        """The node's own one-line error if it printed one, else how it ended."""
        for line in reversed(self.stderr_tail):
            if line.startswith("kluster: error:"):
                return line.removeprefix("kluster: error:").strip()
        if self.last_error:
            return self.last_error
        if status == QProcess.ExitStatus.CrashExit:
            return "the node crashed"
        return f"the node exited with status {code}"

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        proc, self._proc = self._proc, None
        self._read_rest(proc)
        self._kill_timer.stop()
        ran = self.uptime_s() or 0.0
        self.started_at = None
        if self.wanted and self.state is not ProcState.STOPPING:
            reason = self._crash_reason(code, status)
            self.failures = 1 if ran > STABLE_S else self.failures + 1
            self._died(reason)
        elif self.wanted:  # ticked again while it drained: start afresh
            self.state = ProcState.STOPPED
            self.failures = 0
            self._start_process()
        else:
            log.info("the node stopped (status %s)", code)
            self.state = ProcState.STOPPED
            self.last_error = ""
            self.changed.emit()
        if proc is not None:
            proc.deleteLater()

    def _read_rest(self, proc: QProcess | None) -> None:
        if proc is None:
            return
        self._proc = proc
        self._read_stdout()
        self._read_stderr()
        self._proc = None
        for tail in (self._stdout_buf, self._stderr_buf):
            if tail.strip():
                self._on_line(tail.decode("utf-8", "replace").strip())
        self._stdout_buf = self._stderr_buf = b""

    def _error(self, error: QProcess.ProcessError) -> None:
        if error != QProcess.ProcessError.FailedToStart:
            return  # crashes arrive through finished
        proc, self._proc = self._proc, None
        self.started_at = None
        msg = proc.errorString() if proc is not None else "failed to start"
        if proc is not None:
            proc.deleteLater()
        self.failures += 1
        self._died(f"cannot start the node: {msg}")

    def _died(self, reason: str) -> None:
        self.last_error = reason
        if not self.wanted:
            self.state = ProcState.STOPPED
            self.changed.emit()
            return
        delay = self._backoff(max(self.failures, 1))
        self.restarts += 1
        self.state = ProcState.BACKOFF
        self.next_start_at = time.monotonic() + delay
        log.warning("the node stopped unexpectedly (%s); restarting in %.1f s", reason, delay)
        self._restart_timer.start(int(delay * 1000))
        self.crashed.emit(reason)
        self.changed.emit()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning:
            log.warning("the node did not stop in time; killing it")
            self._proc.kill()


def node_argv(
    coordinator: str,
    name: str,
    *,
    device: str = "cpu",
    memory_mb: int | None = None,
    drain_timeout_s: float = 60.0,
    extra: list[str] | None = None,
    python: str | None = None,
) -> list[str]:
    """``kluster node ...`` reporting events on stdout, wrapped so it dies with the app."""
    py = python or sys.executable
    argv = [py, "-m", "supplier_gui.childproc", py, "-m", "engine.cli", "node"]
    argv += ["--coordinator", coordinator, "--name", name, "--events-jsonl", "-"]
    argv += ["--device", device, "--drain-timeout", f"{drain_timeout_s:g}"]
    if memory_mb is not None:
        argv += ["--memory-mb", str(memory_mb)]
    return argv + list(extra or [])


def describe(ev: dict[str, Any]) -> str:
    """A node event in a few words (for the log view and tooltips)."""
    kind = ev.get("event")
    if kind == "ready":
        layers = ev.get("layers") or ["?", "?"]
        return f"serving {ev.get('model_id')} layers {layers[0]}-{layers[1]}"
    if kind == "error":
        return f"error: {ev.get('message')}"
    return str(kind)
