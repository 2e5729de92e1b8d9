"""The tray app's settings: one JSON file in platformdirs' user_config_dir (``supplier.json``).

Why a file of our own and not QSettings: the node, tests and a user with a text editor can all
read it, and every field is validated here with one clear fallback (a damaged file never stops
the app; it starts with defaults and says so in the log). The supplier token is NOT stored here:
see ``credentials``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

#: overrides the config folder (tests, portable installs)
CONFIG_DIR_ENV = "KLUSTER_CONFIG_DIR"
SETTINGS_FILE = "supplier.json"
DEFAULT_COORDINATOR = "http://127.0.0.1:8765"
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def config_dir() -> Path:
    override = os.environ.get(CONFIG_DIR_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_config_dir("kluster"))


def default_node_name() -> str:
    """The host name, reduced to what node names allow (the coordinator shows it in routes)."""
    name = _NAME_OK.sub("-", platform.node()).strip("-.") or "supplier"
    return name[:48]


@dataclass(frozen=True)
class Settings:
    #: where the node registers (and where earnings are read from)
    coordinator_url: str = ""
    #: the name the node registers under
    node_name: str = ""
    #: memory offered to the grid (the node's --memory-mb); None: the node's default (90% of free VRAM)
    vram_cap_mb: int | None = None
    #: share only once the computer has been idle this many minutes (0: share whenever sharing is on)
    idle_minutes: int = 0
    #: stop sharing while a full-screen application runs (where the platform lets us see it)
    pause_fullscreen: bool = True
    #: start the tray app at login (an XDG autostart entry / the Run key; mirrored from the system)
    start_at_login: bool = False
    #: the user's "Share GPU" tick, remembered across restarts
    share: bool = False
    #: signed in to ``coordinator_url`` (the token, if it needs one, is in the credential store)
    signed_in: bool = False
    #: the account the coordinator reported at sign-in ("" for a coordinator without accounts)
    account: str = ""
    #: the UTC day whose first earnings were announced (so a restart does not announce them again)
    earnings_notified_day: str = ""
    #: seconds a drain may take before the node stops anyway (the node's --drain-timeout)
    drain_timeout_s: float = 60.0
    #: cpu or cuda[:N]; "auto": cuda when NVML finds an NVIDIA GPU, else cpu
    device: str = "auto"

    def normalised(self) -> Settings:
        """Out-of-range values replaced by safe ones (a hand-edited file must not crash the app)."""
        cap = self.vram_cap_mb if isinstance(self.vram_cap_mb, int) and self.vram_cap_mb > 0 else None
        idle = self.idle_minutes if isinstance(self.idle_minutes, int) and 0 <= self.idle_minutes <= 24 * 60 else 0
        drain = self.drain_timeout_s if isinstance(self.drain_timeout_s, int | float) else 60.0
        return replace(
            self,
            coordinator_url=str(self.coordinator_url).strip().rstrip("/"),
            node_name=_NAME_OK.sub("-", str(self.node_name)).strip("-.")[:48] or default_node_name(),
            vram_cap_mb=cap,
            idle_minutes=idle,
            drain_timeout_s=float(min(max(drain, 1.0), 3600.0)),
            device=str(self.device) or "auto",
        )


class SettingsStore:
    """Loads and saves ``Settings`` as JSON in ``folder`` (default: ``config_dir()``)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or config_dir()
        self.path = self.folder / SETTINGS_FILE

    def load(self) -> Settings:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Settings().normalised()
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s); starting with default settings", self.path, exc)
            return Settings().normalised()
        if not isinstance(raw, dict):
            log.warning("%s is not a JSON object; starting with default settings", self.path)
            return Settings().normalised()
        known = {f.name for f in fields(Settings)}
        values: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
        return Settings(**values).normalised()

    def save(self, settings: Settings) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(settings), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
