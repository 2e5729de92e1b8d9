"""Where ``kluster-tui`` finds its coordinator and token, resolved once at start-up.

Order, first hit wins:

  coordinator  ``--coordinator`` > ``$KLUSTER_COORDINATOR`` > config file > http://127.0.0.1:8765
  token        ``$KLUSTER_TOKEN`` > keyring (service "kluster", user = coordinator URL) > config file

The config file is ``config.toml`` in platformdirs' user_config_dir for "kluster"
(``~/.config/kluster/config.toml`` on Linux), with top-level keys ``coordinator``, ``token``,
``tenant`` and ``price_per_mtok``. The token never goes on the command line (it would show in
``ps``). A headless box has no keyring backend (``NoKeyringError``), and a broken Secret Service
can raise anything: both fall through to the file quietly, since a missing keyring is normal.
"""

from __future__ import annotations

import logging
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from engine.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_COORDINATOR = "http://127.0.0.1:8765"
COORDINATOR_ENV = "KLUSTER_COORDINATOR"
TOKEN_ENV = "KLUSTER_TOKEN"
KEYRING_SERVICE = "kluster"
CONFIG_NAME = "config.toml"


@dataclass(frozen=True)
class TuiConfig:
    """Everything the TUI needs to know before it draws anything."""

    #: the coordinator's base URL, without a trailing slash
    coordinator: str = DEFAULT_COORDINATOR
    #: bearer token for the coordinator's API (None: send no Authorization header)
    token: str | None = None
    #: where the token came from ("env", "keyring", "file" or "none"); shown, never the token itself
    token_source: str = "none"
    #: the tenant jobs are queued for (fair share between tenants)
    tenant: str = "default"
    #: price per million generated tokens for the "cost so far (est.)" line; 0 until pricing exists
    price_per_mtok: float = 0.0
    #: seconds between polls of nodes, models and jobs (the event stream triggers earlier ones)
    refresh_s: float = 3.0


def config_path() -> Path:
    return Path(platformdirs.user_config_dir("kluster")) / CONFIG_NAME


def read_config_file(path: Path) -> dict[str, Any]:
    """The config file's keys; a missing file is empty, a broken one a one-line ConfigError."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return data


def keyring_token(coordinator: str) -> str | None:
    """The token stored in the system keyring for this coordinator, or None (also when there is no keyring)."""
    try:
        import keyring

        value = keyring.get_password(KEYRING_SERVICE, coordinator)
    except Exception as exc:  # NoKeyringError on a headless box; D-Bus errors from a broken Secret Service
        log.debug("no token from the keyring: %s", exc)
        return None
    return value or None


def _str_option(data: dict[str, Any], key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: '{key}' must be a string")
    return value


def load_config(
    coordinator: str | None = None,
    *,
    tenant: str | None = None,
    price_per_mtok: float | None = None,
    refresh_s: float | None = None,
    env: dict[str, str] | None = None,
    path: Path | None = None,
) -> TuiConfig:
    """Resolve the configuration from arguments, environment, keyring and file (see module docstring)."""
    env = dict(os.environ) if env is None else env
    path = path or config_path()
    data = read_config_file(path)
    url = coordinator or env.get(COORDINATOR_ENV) or _str_option(data, "coordinator", path) or DEFAULT_COORDINATOR
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"coordinator URL must start with http:// or https://, got {url!r}")
    token, source = env.get(TOKEN_ENV) or None, "env"
    if token is None:
        token, source = keyring_token(url), "keyring"
    if token is None:
        token, source = _str_option(data, "token", path), "file"
    if token is None:
        source = "none"
    file_price = data.get("price_per_mtok", 0.0)
    price = price_per_mtok if price_per_mtok is not None else file_price
    if isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price) or price < 0:
        raise ConfigError(f"price per million tokens must be a number >= 0, got {price!r}")
    refresh = 3.0 if refresh_s is None else refresh_s
    if not 0.2 <= refresh <= 300:
        raise ConfigError(f"--refresh must be between 0.2 and 300 seconds, got {refresh:g}")
    return TuiConfig(
        coordinator=url,
        token=token,
        token_source=source,
        tenant=tenant or _str_option(data, "tenant", path) or "default",
        price_per_mtok=float(price),
        refresh_s=refresh,
    )
