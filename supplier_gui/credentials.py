"""The supplier token: in the system keyring, or in a 0600 file where there is no keyring.

A headless Linux box has no Secret Service: keyring's ``fail`` backend raises ``NoKeyringError``
on get and set alike, and the ``null`` backend silently stores nothing. Both are detected (a set
is read back before it is trusted) and the token then goes to ``supplier-token.json`` in the
config folder, readable by this user only. ``Stored.where`` says which one was used, in words the
sign-in dialog shows as they are: a file is not a keyring and the user must know.
Tokens are kept per coordinator URL, so switching coordinators never sends one's token to another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import keyring
import keyring.errors

log = logging.getLogger(__name__)

SERVICE = "kluster-supplier"
TOKEN_FILE = "supplier-token.json"


@dataclass(frozen=True)
class Stored:
    token: str
    #: "keyring" or "file"
    backend: str
    #: for the UI: where the token lives, in plain words
    where: str


def _backend_name() -> str:
    backend = keyring.get_keyring()
    return getattr(backend, "name", type(backend).__name__)


class CredentialStore:
    """get/set/delete the token of a coordinator URL; keyring first, the file as a stated fallback."""

    def __init__(self, folder: Path, service: str = SERVICE) -> None:
        self.folder = folder
        self.service = service
        self.file = folder / TOKEN_FILE

    def file_notice(self, *, before: bool = False) -> str:
        """The plain words for the file fallback (``before``: said before anything is stored)."""
        extra = "" if sys.platform != "win32" else " (on Windows, protected by your user folder's permissions)"
        what = "your token will be stored" if before else "the token is stored"
        return f"No system keyring found: {what} in {self.file}, readable only by you{extra}."

    def keyring_usable(self) -> bool:
        """Whether a real keyring backend is configured (the fail and null backends keep nothing)."""
        import keyring.backends.fail
        import keyring.backends.null

        backend = keyring.get_keyring()
        return not isinstance(backend, keyring.backends.fail.Keyring | keyring.backends.null.Keyring)

    def storage_notice(self) -> str:
        """Where a token will go, said before the user types it."""
        if self.keyring_usable():
            return f"Your token will be kept in the system keyring ({_backend_name()})."
        return self.file_notice(before=True)

    def get(self, url: str) -> Stored | None:
        try:
            token = keyring.get_password(self.service, url)
        except keyring.errors.KeyringError as exc:
            log.debug("keyring unavailable (%s); reading the token file", exc)
            token = None
        if token:
            return Stored(token, "keyring", f"in the system keyring ({_backend_name()})")
        token = self._read_file().get(url)
        return Stored(token, "file", self.file_notice()) if token else None

    def set(self, url: str, token: str) -> Stored:
        """Store ``token`` for ``url``; the keyring if it really keeps it, else the 0600 file."""
        try:
            keyring.set_password(self.service, url, token)
            if keyring.get_password(self.service, url) == token:
                self._drop_from_file(url)
                return Stored(token, "keyring", f"in the system keyring ({_backend_name()})")
            log.info("the keyring backend %s did not keep the token; using the token file", _backend_name())
        except keyring.errors.KeyringError as exc:
            log.info("keyring unavailable (%s); using the token file", exc)
        tokens = self._read_file()
        tokens[url] = token
        self._write_file(tokens)
        return Stored(token, "file", self.file_notice())

    def delete(self, url: str) -> None:
        with contextlib.suppress(keyring.errors.KeyringError):
            keyring.delete_password(self.service, url)
        self._drop_from_file(url)

    # ------------------------------------------------------------------ the file fallback

    def _read_file(self) -> dict[str, str]:
        try:
            raw = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s); ignoring it", self.file, exc)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): v for k, v in raw.items() if isinstance(v, str) and v}

    def _write_file(self, tokens: dict[str, str]) -> None:
        """Created 0600 from the first byte (never world-readable, even for a moment), then renamed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(tokens, f)
        os.chmod(tmp, 0o600)  # in case the umask or the platform changed it
        os.replace(tmp, self.file)

    def _drop_from_file(self, url: str) -> None:
        tokens = self._read_file()
        if url in tokens:
            del tokens[url]
            if tokens:
                self._write_file(tokens)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.file.unlink()
