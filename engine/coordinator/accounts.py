"""Supplier and developer accounts at the coordinator, in SQLite (the standard library's).

An account is a name, a role and the hash of its token. ``kluster coordinator add-user NAME
--role supplier|developer`` creates one and prints its token once; only the token's SHA-256 is
stored. A fast unsalted hash is the right tool here, unlike for passwords: the token is 32 random
bytes, so there is nothing to guess, no dictionary and no rainbow table, while a slow hash
(bcrypt, scrypt) would only make every session exchange burn tens of milliseconds of CPU. Lookups
go by hash (indexed) and the stored hash is compared once more in constant time.

Roles: ``supplier`` runs nodes, ``developer`` submits jobs and opens client sockets, ``admin``
may do both (operators' tools). The long-lived account token is only ever sent to exchange it for
a short-lived session token (``engine.coordinator.auth``).

The coordinator reads this file at every session exchange, so ``add-user`` and ``disable-user``
from another process take effect without a restart (a disabled account's sessions are refused at
their next use). It also records the account each node registered under (``node_accounts``), which
earnings will be computed from.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError

SUPPLIER = "supplier"
DEVELOPER = "developer"
ADMIN = "admin"
ROLES = (SUPPLIER, DEVELOPER, ADMIN)
#: Account tokens start with this, so secret scanners and people recognise one; 32 random bytes follow.
TOKEN_PREFIX = "kt1_"
_TOKEN = re.compile(r"kt1_[A-Za-z0-9_-]{43}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created    REAL NOT NULL,
    disabled   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS node_accounts (
    peer_id    TEXT PRIMARY KEY,
    account    TEXT NOT NULL,
    name       TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    #: seconds since the epoch
    created: float
    disabled: bool


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"account name must be 1-64 letters, digits, '.', '_' or '-' (not first), got {name!r}")
    return name


def _row(row: tuple[str, str, float, int]) -> Account:
    return Account(row[0], row[1], float(row[2]), bool(row[3]))


class AccountStore:
    """Accounts and the node -> account record in one SQLite file (created mode 0600 if missing).

    ``durable=False`` lets commits skip the fsync (WAL with ``synchronous=NORMAL``: safe against a
    crash of the process, a power cut may lose the last commits). The coordinator opens it so:
    its only writes are node records, made on the event loop at every registration (an fsync
    there costs ~0.5 ms each), and lost ones are written again at the node's next registration.
    """

    def __init__(self, path: Path | str, *, durable: bool = True) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # token hashes are no secret, but nobody else needs to read them
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the accounts file {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def add(self, name: str, role: str, now: float | None = None) -> str:
        """Create an account; returns its token, which is stored only as a hash (show it once)."""
        check_name(name)
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        token = new_token()
        try:
            self._db.execute(
                "INSERT INTO accounts (name, role, token_hash, created) VALUES (?, ?, ?, ?)",
                (name, role, token_hash(token), time.time() if now is None else now),
            )
        except sqlite3.IntegrityError:
            raise ConfigError(f"account '{name}' exists already") from None
        return token

    def authenticate(self, token: str) -> Account | None:
        """The account whose token this is (disabled ones included: the caller says why it refuses)."""
        if not _TOKEN.fullmatch(token):
            return None
        digest = token_hash(token)
        row = self._db.execute(
            "SELECT name, role, created, disabled, token_hash FROM accounts WHERE token_hash = ?", (digest,)
        ).fetchone()
        if row is None or not hmac.compare_digest(str(row[4]), digest):
            return None
        return _row(row[:4])

    def get(self, name: str) -> Account | None:
        row = self._db.execute("SELECT name, role, created, disabled FROM accounts WHERE name = ?", (name,)).fetchone()
        return None if row is None else _row(row)

    def accounts(self) -> list[Account]:
        rows = self._db.execute("SELECT name, role, created, disabled FROM accounts ORDER BY name").fetchall()
        return [_row(r) for r in rows]

    def active_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM accounts WHERE disabled = 0").fetchone()[0])

    def set_disabled(self, name: str, disabled: bool = True) -> Account:
        cur = self._db.execute("UPDATE accounts SET disabled = ? WHERE name = ?", (int(disabled), name))
        if cur.rowcount == 0:
            raise ConfigError(f"no account '{name}'")
        account = self.get(name)
        if account is None:  # deleted meanwhile by another process
            raise ConfigError(f"no account '{name}'")
        return account

    def record_node(self, peer_id: str, name: str, account: str, now: float | None = None) -> None:
        """Remember that ``peer_id`` registered under ``account`` (the latest account wins)."""
        at = time.time() if now is None else now
        self._db.execute(
            "INSERT INTO node_accounts (peer_id, account, name, first_seen, last_seen) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(peer_id) DO UPDATE SET account = excluded.account, name = excluded.name, "
            "last_seen = excluded.last_seen",
            (peer_id, account, name, at, at),
        )

    def node_account(self, peer_id: str) -> str | None:
        row = self._db.execute("SELECT account FROM node_accounts WHERE peer_id = ?", (peer_id,)).fetchone()
        return None if row is None else str(row[0])
