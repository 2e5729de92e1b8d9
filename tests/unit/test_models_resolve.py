"""What ``--model`` accepts, and the one-line errors for what it does not."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from engine.errors import ModelNotFoundError
from engine.models.resolve import resolve_model


def test_local_folder_is_accepted(tiny_model_dir: Path) -> None:
    model_id, folder = resolve_model(str(tiny_model_dir))
    assert folder == tiny_model_dir.resolve()
    assert model_id == tiny_model_dir.resolve().name


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face model folder"):
        resolve_model(str(tmp_path))


def test_unknown_name_is_refused() -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'nonsense'"):
        resolve_model("nonsense")


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network in tests: a stand-in hub client fails the way an offline one does."""
    calls: list[str] = []

    def offline(repo_id: str, **_: object) -> str:
        calls.append(repo_id)
        raise OSError("Name or service not known")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(ModelNotFoundError, match="cannot fetch 'org/some-model' from the Hugging Face hub") as err:
        resolve_model("org/some-model")
    assert calls == ["org/some-model"]
    assert "\n" not in str(err.value)


def test_hub_id_without_huggingface_hub_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelNotFoundError, match="huggingface_hub is not installed"):
        resolve_model("org/some-model")
