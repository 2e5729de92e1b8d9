"""Where Kluster keeps files, in one place.

  data   converted models, fragment packs, the coordinator's registry   $KLUSTER_DATA_DIR
  cache  fetched fragments and tokenizers (safe to delete)              $KLUSTER_CACHE_DIR
Defaults are platformdirs' user_data_dir / user_cache_dir for the app name "kluster".
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

DATA_DIR_ENV = "KLUSTER_DATA_DIR"
CACHE_DIR_ENV = "KLUSTER_CACHE_DIR"


def data_dir() -> Path:
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_data_dir("kluster"))


def cache_dir() -> Path:
    override = os.environ.get(CACHE_DIR_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("kluster"))
