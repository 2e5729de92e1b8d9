"""First run: the coordinator URL and the supplier token, checked with the coordinator before use.

The check runs in a worker thread (``Tasks``) so a slow or wrong URL never freezes the window; its
one-line error is shown under the fields. Where the token will be kept (keyring or the 0600 file)
is said before the user types it and again once it is stored.
"""

from __future__ import annotations

import logging
import urllib.parse

from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from supplier_gui.coordinator import CoordinatorClient, SignIn
from supplier_gui.credentials import CredentialStore, Stored
from supplier_gui.settings import DEFAULT_COORDINATOR, Settings
from supplier_gui.tasks import Tasks

log = logging.getLogger(__name__)


def check_url(url: str) -> str | None:
    """None if ``url`` looks like a coordinator address, else what is wrong with it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "the coordinator URL must look like http://host:port or https://host"
    return None


class SignInDialog(QDialog):
    def __init__(
        self, settings: Settings, credentials: CredentialStore, tasks: Tasks, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Kluster - sign in")
        self.credentials = credentials
        self.tasks = tasks
        #: filled in on success
        self.url = ""
        self.token: str | None = None
        self.node_name = settings.node_name
        self.result_sign_in: SignIn | None = None
        self.stored: Stored | None = None

        self.url_edit = QLineEdit(settings.coordinator_url or DEFAULT_COORDINATOR)
        self.token_edit = QLineEdit()
        self.token_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText("from your coordinator's operator (empty: a coordinator without accounts)")
        self.name_edit = QLineEdit(settings.node_name)
        self.notice = QLabel(credentials.storage_notice())
        self.notice.setWordWrap(True)
        self.error = QLabel("")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #c62828")

        form = QFormLayout()
        form.addRow("Coordinator URL", self.url_edit)
        form.addRow("Supplier token", self.token_edit)
        form.addRow("Computer name", self.name_edit)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Sign in")
        self.buttons.accepted.connect(self.check)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Connect this computer to a Kluster coordinator to share its GPU."))
        layout.addLayout(form)
        layout.addWidget(self.notice)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        self.resize(520, self.sizeHint().height())

    def check(self) -> None:
        url = self.url_edit.text().strip().rstrip("/")
        problem = check_url(url)
        if problem is not None:
            self.error.setText(problem)
            return
        token = self.token_edit.text().strip() or None
        self.error.setText("Checking with the coordinator...")
        self.buttons.setEnabled(False)
        self.tasks.run(lambda: CoordinatorClient(url, token).sign_in(), lambda r: self._checked(url, token, r))

    def _checked(self, url: str, token: str | None, result: object) -> None:
        self.buttons.setEnabled(True)
        if isinstance(result, Exception):
            log.info("sign-in failed: %s", result)
            self.error.setText(str(result) or type(result).__name__)
            return
        if not isinstance(result, SignIn):
            self.error.setText("unexpected answer from the coordinator")
            return
        self.url, self.token, self.result_sign_in = url, token, result
        self.node_name = self.name_edit.text().strip() or self.node_name
        if result.auth and token is not None:
            self.stored = self.credentials.set(url, token)
            log.info("signed in as %s; token stored %s", result.account, self.stored.where)
        self.error.setText("")
        self.accept()
