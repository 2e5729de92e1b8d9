"""Test-session set-up shared by every test folder.

Kluster's data and cache directories point into one temporary folder for the session, so tests
never read or write the user's real ones, and a fresh machine (CI) behaves like this one. The
real default model is converted there once per session (a few seconds).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="kluster-tests-"))
os.environ["KLUSTER_DATA_DIR"] = str(_SESSION_ROOT / "data")
os.environ["KLUSTER_CACHE_DIR"] = str(_SESSION_ROOT / "cache")
os.environ.setdefault("KLUSTER_LOGLEVEL", "WARNING")


@pytest.fixture(scope="session")
def session_root() -> Path:
    return _SESSION_ROOT


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real embedded default model, converted into the session's data dir."""
    from engine.models.default_model import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def smollm2_pack3(smollm2_dir: Path, session_root: Path) -> Path:
    """The default model packed into 3 fragments (what `kluster demo` serves)."""
    from engine.fragments.pack import pack_model

    out = session_root / "pack3"
    pack_model(smollm2_dir, out, 3, model_id="smollm2-135m", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_pack2(smollm2_dir: Path, session_root: Path) -> Path:
    """The default model in 2 fragments: 4 nodes then hold every span twice."""
    from engine.fragments.pack import pack_model

    out = session_root / "pack2"
    pack_model(smollm2_dir, out, 2, model_id="smollm2-135m", progress=False)
    return out


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``mktemp`` for module-scoped fixtures, emptied when the module ends (its ``logs`` folders kept).

    Each real cluster fetches ~600 MB of fragments into its node cache and each pack of the real
    model is as big; kept until the session ends they add up to ~15 GB, more than a CI machine's
    disk may hold. Logs stay for a failure's post-mortem.
    """
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for root in made:
        for child in root.iterdir() if root.is_dir() else ():
            if child.name != "logs":
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _cleanup_session_root() -> Iterator[None]:
    yield
    shutil.rmtree(_SESSION_ROOT, ignore_errors=True)
