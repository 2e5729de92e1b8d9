"""Turning what a user typed after ``--model`` into a model folder on disk.

Accepted: the embedded default id (``smollm2-135m``), a local Hugging Face model folder, or a hub
id (``org/name``) fetched through huggingface_hub when it is installed and the hub is reachable.
Every failure is a one-line ``ModelNotFoundError`` that says which of the three was tried.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from engine.errors import ModelNotFoundError
from engine.models.default_model import DEFAULT_MODEL_ID, ensure_default_model

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: seconds before a hub request gives up (this box has no route to the hub: fail fast)
HUB_TIMEOUT_S = 10


def resolve_model(spec: str, *, progress: bool = True) -> tuple[str, Path]:
    """Return ``(model_id, folder)`` for a model spec; see the module docstring."""
    if spec == DEFAULT_MODEL_ID:
        return DEFAULT_MODEL_ID, ensure_default_model(progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but not a Hugging Face model folder (no config.json)")
        return path.resolve().name, path.resolve()
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec.replace("/", "--"), _from_hub(spec)
    raise ModelNotFoundError(
        f"unknown model '{spec}': not '{DEFAULT_MODEL_ID}', not an existing folder, and not a hub id like org/name"
    )


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"'{repo_id}' looks like a hub id, but huggingface_hub is not installed; "
            "download the model and pass its folder"
        ) from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HUB_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_TIMEOUT_S))
    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # huggingface_hub raises many unrelated types; all mean "not available"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelNotFoundError(
            f"cannot fetch '{repo_id}' from the Hugging Face hub (offline or unknown repository): {first_line}"
        ) from None
    return Path(folder)
