"""The token store: a real keyring where one works, else a 0600 file that the UI names."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.backends.null
import keyring.errors
import pytest

from supplier_gui.credentials import CredentialStore

URL = "http://127.0.0.1:8765"


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A working backend, as a desktop's Secret Service would be."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.store.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("not found")


def test_fail_backend_raises_as_on_a_headless_box() -> None:
    """The premise: with the fail backend (conftest), keyring itself raises on get and set."""
    assert isinstance(keyring.get_keyring(), keyring.backends.fail.Keyring)
    with pytest.raises(keyring.errors.NoKeyringError):
        keyring.get_password("x", "y")
    with pytest.raises(keyring.errors.NoKeyringError):
        keyring.set_password("x", "y", "z")


def test_no_keyring_falls_back_to_a_private_file(config_folder: Path) -> None:
    creds = CredentialStore(config_folder)
    assert not creds.keyring_usable()
    assert "No system keyring found" in creds.storage_notice() and str(creds.file) in creds.storage_notice()
    stored = creds.set(URL, "tok-1")
    assert stored.backend == "file" and str(creds.file) in stored.where and "readable only by you" in stored.where
    if sys.platform != "win32":
        assert stat.S_IMODE(creds.file.stat().st_mode) == 0o600
    assert "tok-1" in creds.file.read_text()
    got = creds.get(URL)
    assert got is not None and (got.token, got.backend) == ("tok-1", "file")
    assert creds.get("http://other:1") is None  # tokens are per coordinator
    creds.set("http://other:1", "tok-2")
    creds.delete(URL)
    assert creds.get(URL) is None and creds.get("http://other:1") is not None
    creds.delete("http://other:1")
    assert not creds.file.exists()


def test_null_backend_that_keeps_nothing_is_detected(config_folder: Path) -> None:
    keyring.set_keyring(keyring.backends.null.Keyring())
    creds = CredentialStore(config_folder)
    assert not creds.keyring_usable()
    stored = creds.set(URL, "tok")
    assert stored.backend == "file"  # a set that cannot be read back is not trusted
    got = creds.get(URL)
    assert got is not None and got.token == "tok"


def test_working_keyring_is_preferred(config_folder: Path) -> None:
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    creds = CredentialStore(config_folder)
    assert creds.keyring_usable() and "system keyring" in creds.storage_notice()
    # a token left in the file from a keyring-less past moves into the keyring
    keyring.set_keyring(keyring.backends.fail.Keyring())
    creds.set(URL, "old")
    keyring.set_keyring(backend)
    stored = creds.set(URL, "tok")
    assert stored.backend == "keyring" and backend.store == {("kluster-supplier", URL): "tok"}
    assert not creds.file.exists()
    got = creds.get(URL)
    assert got is not None and (got.token, got.backend) == ("tok", "keyring")
    creds.delete(URL)
    assert backend.store == {}


def test_damaged_token_file_is_ignored(config_folder: Path) -> None:
    creds = CredentialStore(config_folder)
    config_folder.mkdir(parents=True, exist_ok=True)
    creds.file.write_text("[1, 2]")
    assert creds.get(URL) is None
    creds.file.write_text("{bad json")
    assert creds.get(URL) is None
    assert creds.set(URL, "tok").backend == "file" and creds.get(URL) is not None
