"""A small synchronous client of the coordinator's HTTP API, as the tray app needs it.

Synchronous on purpose: the app calls it from a worker thread (``tasks``), never from the Qt
thread, and plain ``urllib`` keeps asyncio out of a Qt process. Errors are ``CoordinatorError``
with a one-line message meant for the UI.

Auth: with a supplier token, requests carry a short-lived session from ``POST /v1/auth/session``
(the account token itself goes nowhere else); a coordinator without accounts is used as it is.
Earnings come from ``GET /v1/earnings`` (integer micro-units); a coordinator without that
endpoint raises ``EarningsUnavailable``, which the dashboard shows as such.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SESSION_PATH = "/v1/auth/session"
SUPPLIER_ROLES = frozenset({"supplier", "admin"})


class CoordinatorError(Exception):
    """Anything that went wrong talking to the coordinator; ``str()`` is one line for the UI."""


class Unauthorized(CoordinatorError):
    """The coordinator refused our token (or wants one and we have none)."""


class EarningsUnavailable(CoordinatorError):
    """This coordinator has no ``/v1/earnings`` endpoint."""


@dataclass(frozen=True)
class Totals:
    units: int = 0
    #: integer micro-units of currency (1_000_000 make one unit)
    amount: int = 0


@dataclass(frozen=True)
class Earnings:
    account: str
    today: Totals
    last_7_days: Totals
    total: Totals
    per_job: Mapping[str, Totals] = field(default_factory=dict)


@dataclass(frozen=True)
class SignIn:
    #: whether the coordinator requires accounts (False: the token, if any, is not needed)
    auth: bool
    account: str = ""
    role: str = ""


def _totals(raw: Any, what: str) -> Totals:
    if not isinstance(raw, dict):
        raise CoordinatorError(f"malformed earnings from the coordinator ({what} is not an object)")
    units, amount = raw.get("units", 0), raw.get("amount", 0)
    if type(units) is not int or type(amount) is not int:
        raise CoordinatorError(f"malformed earnings from the coordinator ({what} is not integer units/amount)")
    return Totals(units, amount)


def parse_earnings(body: Any) -> Earnings:
    """The ``/v1/earnings`` contract, checked (amounts must be integer micro-units)."""
    if not isinstance(body, dict) or body.get("currency_micro") is not True:
        raise CoordinatorError("malformed earnings from the coordinator (amounts are not in micro-units)")
    per_job = body.get("per_job") or {}
    if not isinstance(per_job, dict):
        raise CoordinatorError("malformed earnings from the coordinator (per_job is not an object)")
    return Earnings(
        account=str(body.get("account", "")),
        today=_totals(body.get("today"), "today"),
        last_7_days=_totals(body.get("last_7_days"), "last_7_days"),
        total=_totals(body.get("total"), "total"),
        per_job={str(k): _totals(v, f"job {k}") for k, v in per_job.items()},
    )


def _claims(token: str) -> dict[str, Any]:
    """A JWT's payload, unverified: only to check the nonce we sent came back."""
    try:
        part = token.split(".")[1]
        value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _reason(body: bytes, status: int) -> str:
    try:
        err = json.loads(body).get("error", {})
        return str(err.get("message")) if isinstance(err, dict) and err.get("message") else f"HTTP {status}"
    except (ValueError, AttributeError):
        return f"HTTP {status}"


class CoordinatorClient:
    """Talks to one coordinator with one (optional) supplier token; safe to share between threads."""

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.token = token or None
        self.timeout_s = timeout_s
        self._session = ""
        self._valid_until = 0.0
        self._lock = threading.Lock()
        #: (account, role) of the last session exchange
        self._identity = ("", "")
        #: whether the coordinator wants accounts; None: not probed yet (a token is sent only if it does)
        self._auth: bool | None = None

    @property
    def auth_known(self) -> bool | None:
        """Whether the coordinator wants accounts, as last seen; None before the first request."""
        return self._auth

    # ------------------------------------------------------------------ plumbing

    def _open(self, method: str, path: str, body: Any = None, bearer: str | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if bearer:
            req.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise CoordinatorError(f"cannot reach the coordinator at {self.url}: {reason}") from None

    def _exchange(self) -> str:
        """A fresh session for our account token (the only request that carries the token itself)."""
        nonce = secrets.token_urlsafe(24)
        status, raw = self._open("POST", SESSION_PATH, {"nonce": nonce}, bearer=self.token)
        if status != 200:
            raise Unauthorized(f"the coordinator refused this token: {_reason(raw, status)}")
        try:
            body = json.loads(raw)
            session = str(body["session"])
        except (ValueError, KeyError, TypeError):
            raise CoordinatorError("the coordinator answered the sign-in with something unreadable") from None
        if _claims(session).get("nonce") != nonce:
            raise CoordinatorError("the coordinator answered with a session for another request")
        ttl = body.get("expires_in")
        ttl = float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) else 600.0
        with self._lock:
            self._session, self._valid_until = session, time.monotonic() + ttl
        self._identity = (str(body.get("account", "")), str(body.get("role", "")))
        return session

    def _bearer(self) -> str | None:
        if self.token is None:
            return None
        if self._auth is None:
            self._auth = self.auth_required()
        if not self._auth:  # an open coordinator refuses account tokens: don't send one
            return None
        with self._lock:
            if self._session and time.monotonic() < self._valid_until - 60:
                return self._session
        return self._exchange()

    def get_json(self, path: str) -> Any:
        status, raw = self._open("GET", path, bearer=self._bearer())
        if status == 401 and self.token is not None:  # the session died, or accounts were switched on
            with self._lock:
                self._session, self._auth = "", None
            status, raw = self._open("GET", path, bearer=self._bearer())
        if status == 401:
            raise Unauthorized(f"the coordinator refused us: {_reason(raw, status)}")
        if status == 404:
            raise _NotFound(_reason(raw, status))
        if status != 200:
            raise CoordinatorError(f"the coordinator answered {path} with {_reason(raw, status)}")
        try:
            return json.loads(raw)
        except ValueError:
            raise CoordinatorError(f"the coordinator answered {path} with something other than JSON") from None

    # ------------------------------------------------------------------ the API

    def auth_required(self) -> bool:
        """Whether this coordinator wants accounts (probed with an unauthenticated ``/v1/nodes``)."""
        status, raw = self._open("GET", "/v1/nodes")
        if status in (200, 401, 403):
            self._auth = status != 200
            return self._auth
        raise CoordinatorError(f"{self.url} does not look like a Kluster coordinator ({_reason(raw, status)})")

    def sign_in(self) -> SignIn:
        """Check the URL and token the user typed; one-line errors for each way it can be wrong."""
        if not self.auth_required():
            return SignIn(auth=False)
        if self.token is None:
            raise Unauthorized("this coordinator requires a supplier token")
        self._exchange()
        account, role = self._identity
        if role and role not in SUPPLIER_ROLES:
            raise Unauthorized(f"this token belongs to a {role} account; sharing needs a supplier account's token")
        return SignIn(auth=True, account=account, role=role)

    def nodes(self) -> list[dict[str, Any]]:
        body = self.get_json("/v1/nodes")
        nodes = body.get("nodes") if isinstance(body, dict) else None
        return [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []

    def node(self, name: str) -> dict[str, Any] | None:
        """This supplier's node as the coordinator sees it, if it is registered."""
        return next((n for n in self.nodes() if n.get("name") == name), None)

    def earnings(self) -> Earnings:
        try:
            return parse_earnings(self.get_json("/v1/earnings"))
        except _NotFound:
            raise EarningsUnavailable("earnings not available from this coordinator") from None


class _NotFound(CoordinatorError):
    pass
