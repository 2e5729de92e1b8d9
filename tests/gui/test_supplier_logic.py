"""Pure parts of the supplier app: the state decision, backoff, the node view, notifications,
earnings arithmetic, settings, autostart entries and the exported icons."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from supplier_gui import autostart, notify
from supplier_gui.earnings import format_amount, last_days, predict, record
from supplier_gui.icons import icon_svg
from supplier_gui.nodeview import NodeView, apply_event
from supplier_gui.settings import Settings, SettingsStore
from supplier_gui.state import Inputs, TrayState, decide
from supplier_gui.supervisor import backoff_delay, node_argv

NOW = 1_700_000_000.0


def inputs(**kw: object) -> Inputs:
    base: dict[str, object] = {"signed_in": True, "share": True, "now": NOW, "process": "running", "phase": "ready"}
    return Inputs(**{**base, **kw})  # type: ignore[arg-type]


def test_decide_states() -> None:
    assert decide(inputs(signed_in=False)).state is TrayState.IDLE
    assert not decide(inputs(signed_in=False)).run
    assert decide(inputs(share=False)).run is False
    assert decide(inputs(share=False, process="stopping")).reason.endswith("finishing the sessions in progress")
    ready = decide(inputs())
    assert (ready.state, ready.run, ready.reason) == (TrayState.SHARING, True, "sharing: ready for requests")
    assert decide(inputs(sessions=2)).state is TrayState.SERVING
    assert decide(inputs(sessions=2)).reason == "serving 2 sessions"
    assert decide(inputs(process="starting", phase="")).reason == "starting the node"
    assert decide(inputs(phase="assigned")).reason == "sharing: loading its fragments"
    crashed = decide(inputs(process="backoff", error="boom"))
    assert (crashed.state, crashed.run, crashed.reason) == (TrayState.ERROR, True, "boom")


def test_decide_holds() -> None:
    paused = decide(inputs(paused_until=NOW + 60))
    assert (paused.state, paused.run) == (TrayState.PAUSED, False)
    assert paused.reason.startswith("paused until ")
    assert decide(inputs(paused_until=NOW - 1)).state is TrayState.SHARING  # the pause is over
    # idle rule: 5 min wanted, 10 s idle -> held; 6 min idle -> shares; unmeasurable -> never holds
    assert decide(inputs(idle_required_s=300, idle_s=10)).state is TrayState.PAUSED
    assert decide(inputs(idle_required_s=300, idle_s=360)).state is TrayState.SHARING
    assert decide(inputs(idle_required_s=300, idle_s=None)).state is TrayState.SHARING
    fullscreen = decide(inputs(pause_fullscreen=True, fullscreen=True))
    assert fullscreen.reason == "paused while a full-screen application runs"
    assert decide(inputs(pause_fullscreen=True, fullscreen=None)).state is TrayState.SHARING
    assert decide(inputs(pause_fullscreen=False, fullscreen=True)).state is TrayState.SHARING


def test_backoff_policy() -> None:
    assert backoff_delay(0) == 0.0
    assert [backoff_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 32, 60]
    assert backoff_delay(500) == 60.0  # capped, and no overflow
    assert backoff_delay(3, 0.0) == pytest.approx(3.6) and backoff_delay(3, 0.999) == pytest.approx(4.4, abs=0.01)
    assert backoff_delay(2, rnd=7.0) == pytest.approx(2.2)  # rnd clamped


def test_node_argv() -> None:
    argv = node_argv("http://c:1", "box", device="cpu", memory_mb=2048, drain_timeout_s=30, python="py")
    assert argv[:6] == ["py", "-m", "supplier_gui.childproc", "py", "-m", "engine.cli"]
    assert argv[6:] == [
        "node", "--coordinator", "http://c:1", "--name", "box", "--events-jsonl", "-",
        "--device", "cpu", "--drain-timeout", "30", "--memory-mb", "2048",
    ]  # fmt: skip


def test_node_view_follows_events() -> None:
    v = NodeView()
    for ev in (
        {"event": "registered", "peer_id": "n-1"},
        {"event": "assigned", "model_id": "m", "units": [0, 3]},
        {"event": "ready", "model_id": "m", "layers": [0, 30]},
        {"event": "session_start", "session": "s", "model_id": "m", "layers": [0, 30]},
        {"event": "session_progress", "session": "s", "tokens": 40, "tokens_per_s": 12.5, "seconds": 3.2},
    ):
        v = apply_event(v, ev)
    assert (v.phase, v.peer_id, v.layers) == ("ready", "n-1", (0, 30))
    assert v.sessions["s"].tokens == 40 and v.sessions["s"].tokens_per_s == 12.5
    v = apply_event(v, {"event": "session_end", "session": "s", "tokens": 50, "tokens_per_s": 10.0})
    assert v.sessions == {} and v.finished == 1 and v.finished_tokens == 50 and v.last is not None
    v = apply_event(v, {"event": "error", "message": "bad"})
    assert v.error == "bad"
    assert apply_event(v, {"event": "no-such-event"}) is v


def test_notifications() -> None:
    s = notify.NotifyState()
    show, s = notify.first_earnings(s, "2024-01-01", 0)
    assert not show
    show, s = notify.first_earnings(s, "2024-01-01", 5)
    assert show
    show, s = notify.first_earnings(s, "2024-01-01", 9)
    assert not show  # once a day
    show, s = notify.first_earnings(s, "2024-01-02", 1)
    assert show
    show, s = notify.error(s, "boom", 100.0)
    assert show
    assert not notify.error(s, "boom", 200.0)[0]  # the same error within 10 min: quiet
    assert notify.error(s, "other", 200.0)[0]
    assert notify.error(s, "boom", 100.0 + notify.ERROR_REPEAT_S)[0]


def test_earnings_arithmetic() -> None:
    assert [format_amount(x) for x in (0, 1, 1234, 1_500_000, 12_345_678_901)] == [
        "0.00", "0.000001", "0.001234", "1.50", "12,345.678901",
    ]  # fmt: skip
    h = record({}, "2024-01-05", 10)
    h = record(h, "2024-01-05", 7)  # never lowered (a later poll in the same day)
    h = record(h, "2024-01-07", 30)
    assert h == {"2024-01-05": 10, "2024-01-07": 30}
    days = last_days(h, "2024-01-07", 3)
    assert days == [("2024-01-05", 10), ("2024-01-06", None), ("2024-01-07", 30)]
    p = predict(70, h, "2024-01-07")  # first earnings 3 days ago: averaged over 3 days
    assert (p.days, p.per_day, p.per_month) == (3, 23, 690)
    assert predict(70, {}, "2024-01-07").days == 1
    many = {f"2023-{m:02d}-{d:02d}": 1 for m in range(1, 13) for d in range(1, 28)}
    assert len(record(many, "2024-01-01", 1)) == 90


def test_settings_roundtrip_and_damage(config_folder: Path) -> None:
    store = SettingsStore(config_folder)
    s = store.load()
    assert s.coordinator_url == "" and s.node_name and not s.signed_in
    store.save(Settings(coordinator_url="http://c:1/", node_name="my box!", vram_cap_mb=4096, share=True).normalised())
    loaded = store.load()
    assert (loaded.coordinator_url, loaded.node_name, loaded.vram_cap_mb, loaded.share) == (
        "http://c:1",
        "my-box",
        4096,
        True,
    )
    raw = json.loads(store.path.read_text())
    raw.update(vram_cap_mb=-5, idle_minutes="x", unknown_field=1)
    store.path.write_text(json.dumps(raw))
    damaged = store.load()
    assert damaged.vram_cap_mb is None and damaged.idle_minutes == 0
    store.path.write_text("{not json")
    assert store.load() == Settings().normalised()


def test_autostart_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = autostart.desktop_entry(["/opt/my apps/kluster-supplier", "--x=50%"])
    assert "Exec='/opt/my apps/kluster-supplier' --x=50%%\n" in entry
    assert entry.startswith("[Desktop Entry]\nType=Application\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert not autostart.is_enabled()
    autostart.set_enabled(True, ["/usr/bin/kluster-supplier"])
    path = tmp_path / "autostart" / "kluster-supplier.desktop"
    assert autostart.is_enabled() and "Exec=/usr/bin/kluster-supplier\n" in path.read_text()
    autostart.set_enabled(False)
    assert not path.exists() and not autostart.is_enabled()


def test_exported_icons_match_the_generator() -> None:
    folder = Path(__file__).parents[2] / "assets" / "icons"
    for state in TrayState:
        assert (folder / f"kluster-{state.value}.svg").read_text() == icon_svg(state), (
            "assets/icons is stale: run python -m supplier_gui.icons assets/icons"
        )
        assert (folder / f"kluster-{state.value}.png").stat().st_size > 500
    assert len({icon_svg(s) for s in TrayState}) == len(TrayState)


def test_pause_reason_uses_local_time() -> None:
    until = time.time() + 3600
    d = decide(inputs(now=time.time(), paused_until=until))
    assert time.strftime("%H:%M", time.localtime(until)) in d.reason


def test_the_app_never_loads_torch_or_the_engine() -> None:
    """The tray talks to a node process; importing it must stay light (and crash-proof)."""
    import subprocess
    import sys

    code = "import sys, supplier_gui.app; print(sorted(m for m in sys.modules if m in ('torch', 'engine')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
