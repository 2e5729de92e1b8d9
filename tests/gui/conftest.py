"""Qt offscreen, a private config folder per test, and a keyring that has no backend.

QT_QPA_PLATFORM must be set before the QApplication exists (pytest-qt makes it on first use).
The keyring is set to the ``fail`` backend, as on a headless box: tests that want a working
keyring install their own in-memory one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # never a real window or tray, even on a desktop

pytest.importorskip("PySide6.QtWidgets", reason="the supplier app needs PySide6")

import keyring
import keyring.backends.fail
from supplier_fakes import FakeCoordinator

FAKE_NODE = Path(__file__).with_name("supplier_fake_node.py")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "config"
    monkeypatch.setenv("KLUSTER_CONFIG_DIR", str(folder))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("KLUSTER_TOKEN", raising=False)
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())
    try:
        yield folder
    finally:
        keyring.set_keyring(previous)


@pytest.fixture
def config_folder(_isolated: Path) -> Path:
    return _isolated


@pytest.fixture
def fake_coordinator() -> Iterator[FakeCoordinator]:
    fake = FakeCoordinator().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake_node_argv(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """(argv prefix, control folder, start-count file) for ``fake_node.py``."""
    control = tmp_path / "control"
    control.mkdir()
    count = tmp_path / "starts"
    return [sys.executable, str(FAKE_NODE), "--control", str(control), "--count", str(count)], control, count
