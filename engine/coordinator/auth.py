"""Session tokens: short-lived proofs of an account, and the coordinator's gate that checks them.

Flow. A node or client sends its long-lived account token (``engine.coordinator.accounts``) only
to ``POST /v1/auth/session`` (``Authorization: Bearer <account token>``, body ``{"nonce": N}``,
N fresh random) and gets a session token valid for ``session_ttl_s`` (default 10 min). Sessions go
in ``Authorization: Bearer`` headers on HTTP requests, and in the ``session`` field of the
WebSocket hello (next to the proof of the peer's key), which must come from a ``supplier``
account for a node and a ``developer`` account for a client (``admin``: either).

Format. A JWT (RFC 7519) signed with HS256, written here with ``hmac``/``hashlib`` (no new
dependency, and the few lines leave no option to misconfigure). Verification is strict by
construction:

* the algorithm list is fixed to {HS256} and never read from the token: a header naming ``none``,
  ``RS256``/``ES256`` (algorithm confusion: a token "signed" with a public key used as the HMAC
  secret) or anything else is refused before a signature is even computed;
* ``exp``, ``iat``, ``aud`` (exactly ``kluster-coordinator``), ``sub``, ``role``, ``jti`` and
  ``nonce`` are required; a leeway of 10 s applies to ``exp`` and ``iat``;
* the signature over the exact bytes received is compared in constant time.

Replays. A nonce is accepted once per account while the session it minted lives, and a session
token opens at most one WebSocket (its ``jti`` is remembered until it expires), so a leaked
session token is good for one node socket at most. Both live in a bounded cache that refuses new
entries when full (fail closed, 503) rather than forgetting live ones. None of this replaces TLS:
whoever captures an account token can mint sessions, so expose the coordinator through https.

The secret. 32 random bytes per coordinator start, unless ``--session-secret-file PATH`` (first
line) or ``$KLUSTER_SESSION_SECRET`` gives one (>= 32 characters): with a random one a restart
invalidates every session, which peers notice at their next request or reconnect and replace
(``SessionAuth`` fetches a fresh session for each hello).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import heapq
import hmac
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from engine.coordinator.accounts import ADMIN, DEVELOPER, ROLES, SUPPLIER, AccountStore
from engine.coordinator.ratelimit import Buckets, RateLimits, client_key, retry_after
from engine.errors import ConfigError, CoordinatorError, KlusterError

log = logging.getLogger(__name__)

AUDIENCE = "kluster-coordinator"
#: The only signature algorithm accepted, whatever a token's header says.
ALGORITHMS = frozenset({"HS256"})
LEEWAY_S = 10.0
DEFAULT_TTL_S = 600.0
MAX_TTL_S = 86_400.0
MAX_TOKEN_CHARS = 4096
REQUIRED_CLAIMS = ("exp", "iat", "aud", "sub", "role", "jti", "nonce")
SESSION_PATH = "/v1/auth/session"
#: Where nodes and clients find their account token when no ``--token-file`` is given.
TOKEN_ENV = "KLUSTER_TOKEN"
SECRET_ENV = "KLUSTER_SESSION_SECRET"
#: WebSocket close code for a hello without an acceptable session (4000: bad identity proof).
CLOSE_UNAUTHORIZED = 4003
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_B64 = re.compile(r"[A-Za-z0-9_-]*")


class AuthError(KlusterError):
    """No valid session (or account token): the request is refused with 401 and this reason."""

    code = "unauthorized"


class ForbiddenError(AuthError):
    """A valid session whose account's role may not do this (403)."""

    code = "forbidden"


class RateLimitedError(KlusterError):
    """Too many requests from one address or account (429)."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AuthBusyError(KlusterError):
    """The replay cache is full: new sessions wait until old ones expire (503)."""

    code = "busy"


# ------------------------------------------------------------------ token format


@dataclass(frozen=True)
class Claims:
    sub: str
    role: str
    exp: float
    iat: float
    jti: str
    nonce: str
    aud: str = AUDIENCE


#: ``request.get(ACCOUNT)``: the verified claims of an authenticated request (absent when auth is off).
ACCOUNT = web.RequestKey("kluster_account", Claims)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(part: str, what: str) -> bytes:
    """Strict base64url without padding (RFC 7515), so one token has exactly one encoding."""
    if not _B64.fullmatch(part) or len(part) % 4 == 1:
        raise AuthError(f"malformed session token ({what} is not base64url)")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise AuthError(f"malformed session token ({what} is not base64url)") from None


def _json_part(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(part, what))
    except ValueError:
        raise AuthError(f"malformed session token ({what} is not JSON)") from None
    if not isinstance(value, dict):
        raise AuthError(f"malformed session token ({what} is not a JSON object)")
    return value


def _sign(secret: bytes, signing_input: str) -> bytes:
    return hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()


def encode_token(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """``header.payload.signature``, HMAC-SHA256 over the first two parts (tests forge tokens with it)."""
    head = _b64encode(json.dumps(header, separators=(",", ":")).encode())
    body = _b64encode(json.dumps(payload, separators=(",", ":")).encode())
    return f"{head}.{body}.{_b64encode(_sign(secret, f'{head}.{body}'))}"


def issue_session(secret: bytes, sub: str, role: str, nonce: str, *, now: float, ttl_s: float = DEFAULT_TTL_S) -> str:
    payload = {
        "sub": sub,
        "role": role,
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now + ttl_s),
        "jti": secrets.token_urlsafe(16),
        "nonce": nonce,
    }
    return encode_token({"alg": "HS256", "typ": "JWT"}, payload, secret)


def _number(payload: dict[str, Any], key: str) -> float:
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(f"session token claim '{key}' is not a number")
    return float(value)


def _text(payload: dict[str, Any], key: str, limit: int = 128) -> str:
    value = payload[key]
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise AuthError(f"session token claim '{key}' is not a short string")
    return value


def verify_session(token: object, secret: bytes, *, now: float, leeway_s: float = LEEWAY_S) -> Claims:
    """The claims of a session token this coordinator signed and that is valid at ``now``; else AuthError."""
    if not isinstance(token, str) or not token:
        raise AuthError("no session token")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError("session token is too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed session token (not header.payload.signature)")
    header = _json_part(parts[0], "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise AuthError(f"session token algorithm {alg!r} is not accepted (only HS256)")
    if header.get("typ", "JWT") != "JWT" or "crit" in header:
        raise AuthError("session token header is not a plain JWT header")
    signature = _b64decode(parts[2], "signature")
    if not hmac.compare_digest(signature, _sign(secret, f"{parts[0]}.{parts[1]}")):
        raise AuthError("session token signature does not verify")
    payload = _json_part(parts[1], "payload")
    missing = [c for c in REQUIRED_CLAIMS if c not in payload]
    if missing:
        raise AuthError(f"session token lacks the claim(s) {', '.join(missing)}")
    if payload["aud"] != AUDIENCE:
        raise AuthError(f"session token is for another audience ({str(payload['aud'])[:40]!r})")
    exp, iat = _number(payload, "exp"), _number(payload, "iat")
    if now > exp + leeway_s:
        raise AuthError(f"session token expired {now - exp:.0f} s ago")
    if iat > now + leeway_s or exp - iat > MAX_TTL_S or exp < iat:
        raise AuthError("session token has an impossible issue time or lifetime")
    role = _text(payload, "role")
    if role not in ROLES:
        raise AuthError(f"session token has an unknown role {role!r}")
    return Claims(
        sub=_text(payload, "sub", 64),
        role=role,
        exp=exp,
        iat=iat,
        jti=_text(payload, "jti"),
        nonce=_text(payload, "nonce"),
    )


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a token without checking anything: for a client to read what it was given."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed session token (not header.payload.signature)")
    return _json_part(parts[1], "payload")


class ReplayCache:
    """Keys seen recently, each remembered until its own expiry; at most ``max_entries`` (then fail closed)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def seen(self, key: str, until: float, now: float) -> bool:
        """True if ``key`` is remembered (a replay); otherwise remember it until ``until`` and return False."""
        while self._heap and self._heap[0][0] <= now:
            at, old = heapq.heappop(self._heap)
            if self._until.get(old) == at:
                del self._until[old]
        if key in self._until:
            return True
        if len(self._until) >= self.max_entries:
            raise AuthBusyError("too many sessions in flight at this coordinator; try again in a minute")
        self._until[key] = until
        heapq.heappush(self._heap, (until, key))
        return False


def load_session_secret(path: Path | None) -> tuple[bytes, str]:
    """(secret, where it came from): ``path``'s first line, ``$KLUSTER_SESSION_SECRET``, or 32 random bytes."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the session secret file {path}: {exc}") from None
        source = str(path)
    else:
        text, source = os.environ.get(SECRET_ENV, "").strip(), f"${SECRET_ENV}"
        if not text:
            return secrets.token_bytes(32), "random, for this run"
    if len(text) < 32:
        raise ConfigError(f"the session secret from {source} must be at least 32 characters")
    return text.encode(), source


def load_account_token(path: Path | None) -> str | None:
    """A node's or client's account token: ``path``'s first line, else ``$KLUSTER_TOKEN``, else None."""
    if path is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"the token file {path} is empty")
    return token


# ------------------------------------------------------------------ the coordinator's gate

#: Who may use a path when auth is on (checked in order; the first matching prefix wins).
#: None: open. The WebSocket upgrade is open here because its hello carries the session.
_ACCESS: tuple[tuple[str, frozenset[str] | None], ...] = (
    ("/v1/health", None),
    (SESSION_PATH, None),
    ("/v1/ws", None),
    ("/v1/route", frozenset({DEVELOPER, ADMIN})),
    ("/v1/jobs", frozenset({DEVELOPER, ADMIN})),
    ("/v1/events", frozenset({DEVELOPER, ADMIN})),
    ("/v1/earnings", frozenset({SUPPLIER, ADMIN})),
    ("/v1/spend", frozenset({DEVELOPER, ADMIN})),
)
#: Anything else (models, nodes, fragment and tokenizer files): any account.
_ANY = frozenset(ROLES)
_HELLO_ROLES = {"node": frozenset({SUPPLIER, ADMIN}), "client": frozenset({DEVELOPER, ADMIN})}


def access_for(path: str) -> frozenset[str] | None:
    """The roles allowed on ``path`` (None: no session needed)."""
    for prefix, roles in _ACCESS:
        if path == prefix or path.startswith(prefix + "/"):
            return roles
    return _ANY


def error_response(status: int, err: KlusterError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": err.code, "message": str(err)}}, status=status, headers=headers)


def refusal(err: KlusterError) -> web.Response:
    """The HTTP answer to a request refused with ``err`` (status and headers by its kind)."""
    status, headers = _status(err)
    return error_response(status, err, headers)


def _status(err: KlusterError) -> tuple[int, dict[str, str] | None]:
    if isinstance(err, RateLimitedError):
        return 429, {"Retry-After": retry_after(err.retry_after_s)}
    if isinstance(err, ForbiddenError):
        return 403, None
    if isinstance(err, AuthBusyError):
        return 503, {"Retry-After": "60"}
    if isinstance(err, AuthError):
        return 401, {"WWW-Authenticate": 'Bearer realm="kluster"'}
    return 400, None


def _bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("no credentials: send 'Authorization: Bearer <token>'")
    return value.strip()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AuthGate:
    """Rate limits, session exchange and session checks for one coordinator.

    ``enabled`` False (auth off) keeps the rate limits and still exchanges valid account tokens,
    but lets every request and hello through without a session.
    """

    def __init__(
        self,
        store: AccountStore | None,
        *,
        enabled: bool,
        secret: bytes,
        ttl_s: float = DEFAULT_TTL_S,
        limits: RateLimits | None = None,
        leeway_s: float = LEEWAY_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if enabled and store is None:
            raise ConfigError("auth needs an accounts file")
        if not 30 <= ttl_s <= MAX_TTL_S:
            raise ConfigError(f"the session lifetime must be 30-{MAX_TTL_S:.0f} s, got {ttl_s:g}")
        limits = limits or RateLimits()
        self.store, self.enabled, self.ttl_s, self.leeway_s = store, enabled, ttl_s, leeway_s
        self._secret = secret
        self._clock, self._monotonic = clock, monotonic
        self._per_ip = Buckets(limits.per_ip, limits.max_keys) if limits.per_ip else None
        self._per_account = Buckets(limits.per_account, limits.max_keys) if limits.per_account else None
        self._audits = Buckets(limits.audit_positions, limits.max_keys) if limits.audit_positions else None
        self.replay = ReplayCache()

    def _limit(self, buckets: Buckets | None, key: str, who: str) -> None:
        if buckets is not None and (wait := buckets.take(key, self._monotonic())) > 0:
            raise RateLimitedError(f"too many requests from {who}; retry in {math.ceil(wait)} s", wait)

    def charge_audit(self, request: web.Request, positions: int) -> None:
        """Take ``positions`` from the spot-check budget of the request's account (auth off: its
        address); RateLimitedError when it is spent."""
        if self._audits is None:
            return
        claims = request.get(ACCOUNT)
        who = f"account '{claims.sub}'" if isinstance(claims, Claims) else "this address"
        key = claims.sub if isinstance(claims, Claims) else client_key(request.remote)
        if (wait := self._audits.take(key, self._monotonic(), positions)) > 0:
            rate = self._audits.limit.rate
            raise RateLimitedError(
                f"spot checks of {who} are over their budget of {rate:g} positions/s; retry in {math.ceil(wait)} s",
                wait,
            )

    def verify(self, token: object, roles: frozenset[str], what: str) -> Claims:
        """The claims of a session allowed to do ``what``, its account still active; else AuthError."""
        claims = verify_session(token, self._secret, now=self._clock(), leeway_s=self.leeway_s)
        if claims.role not in roles:
            raise ForbiddenError(f"a {claims.role} account cannot {what}")
        account = self.store.get(claims.sub) if self.store is not None else None
        if account is None or account.disabled:
            raise AuthError(f"account '{claims.sub}' is disabled or gone")
        self._limit(self._per_account, claims.sub, f"account '{claims.sub}'")
        return claims

    def middleware(self) -> Any:
        @web.middleware
        async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                self._limit(self._per_ip, client_key(request.remote), "this address")
                roles = access_for(request.path)
                if self.enabled and roles is not None:
                    request[ACCOUNT] = self.verify(_bearer(request), roles, f"use {request.path}")
            except KlusterError as exc:
                return refusal(exc)
            return await handler(request)

        return gate

    async def exchange(self, request: web.Request) -> web.Response:
        """``POST /v1/auth/session``: an account token (Bearer) and a fresh nonce -> a session token."""
        try:
            if self.store is None:
                raise AuthError("this coordinator has no accounts (auth is off)")
            account = self.store.authenticate(_bearer(request))
            if account is None:
                raise AuthError("unknown account token")
            if account.disabled:
                raise AuthError(f"account '{account.name}' is disabled")
            self._limit(self._per_account, account.name, f"account '{account.name}'")
            try:
                body = await request.json()
            except ValueError:
                body = None
            nonce = body.get("nonce") if isinstance(body, dict) else None
            if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
                raise ConfigError('the body must be {"nonce": <16-128 random base64url characters>}')
            now, mono = self._clock(), self._monotonic()
            if self.replay.seen(f"n:{account.name}:{nonce}", mono + self.ttl_s + self.leeway_s, mono):
                raise AuthError("replayed nonce: every session request needs a fresh one")
            token = issue_session(self._secret, account.name, account.role, nonce, now=now, ttl_s=self.ttl_s)
        except KlusterError as exc:
            status, headers = _status(exc)
            return error_response(status, exc, headers)
        log.debug("session for %s (%s)", account.name, account.role)
        return web.json_response(
            {"session": token, "expires_in": self.ttl_s, "account": account.name, "role": account.role}
        )

    def check_hello(self, hello: dict[str, Any], role: str) -> str | None:
        """The account a peer's hello is authorised by (None when auth is off); else AuthError.

        A session token opens one WebSocket only: its ``jti`` is remembered until it expires.
        """
        if not self.enabled:
            return None
        what = "register a node" if role == "node" else "connect as a client"
        claims = self.verify(hello.get("session"), _HELLO_ROLES.get(role, frozenset()), what)
        mono = self._monotonic()
        if self.replay.seen(f"j:{claims.jti}", mono + claims.exp + self.leeway_s - self._clock(), mono):
            raise AuthError("this session token already opened a WebSocket (replayed jti); fetch a new one")
        return claims.sub


# ------------------------------------------------------------------ the peers' side


class SessionAuth:
    """A node's or client's sessions at the coordinator, exchanged for its account token as needed.

    ``headers()`` gives a session valid for at least a minute more (HTTP requests may reuse it);
    ``hello()`` hands the freshest session at hand to a WebSocket hello and fetches the next in the
    background, since a session opens one socket only. A reconnect after a coordinator restart (new
    secret) or a long quiet spell may thus fail once, and the next attempt carries a fresh session.

    Each renewal first asks ``/v1/health`` whether the coordinator wants sessions at all: one with
    auth off (``kluster demo``, a test grid) gets no token, so a ``$KLUSTER_TOKEN`` left in the
    shell does no harm there, and one that switches auth on is noticed at the next renewal.
    """

    def __init__(self, coordinator: str, account_token: str, *, timeout_s: float = 10.0) -> None:
        self.coordinator = coordinator.rstrip("/")
        self._account_token = account_token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = ""
        self._valid_until = 0.0
        self._next: asyncio.Task[None] | None = None
        #: whether the coordinator wants sessions, as last asked (None: not asked yet)
        self.required: bool | None = None
        #: the account and role the coordinator reported at the last exchange
        self.account = ""
        self.role = ""

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as http,
                http.request(method, self.coordinator + path, **kwargs) as resp,
            ):
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise CoordinatorError(f"cannot reach the coordinator at {self.coordinator}: {reason}") from None

    async def refresh(self) -> str:
        """A new session now ("" when the coordinator runs with auth off); one-line errors."""
        started = time.monotonic()
        _, health = await self._request("GET", "/v1/health")
        required = not isinstance(health, dict) or health.get("auth") is not False
        if required != self.required and self.required is not None:
            log.info("the coordinator at %s switched auth %s", self.coordinator, "on" if required else "off")
        self.required = required
        if not required:
            self._session, self._valid_until = "", started + 120  # ask again in a while
            return ""
        nonce = secrets.token_urlsafe(24)
        headers = {"Authorization": f"Bearer {self._account_token}"}
        status, body = await self._request("POST", SESSION_PATH, json={"nonce": nonce}, headers=headers)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("session"), str):
            err = body.get("error", {}) if isinstance(body, dict) else {}
            reason = err.get("message") if isinstance(err, dict) else None
            raise AuthError(f"the coordinator at {self.coordinator} refused our account token: {reason or status}")
        token = str(body["session"])
        if unverified_claims(token).get("nonce") != nonce:  # not minted for this request: a replayed answer
            raise AuthError(f"the coordinator at {self.coordinator} answered with a session for another request")
        ttl = body.get("expires_in")
        ttl = float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) else DEFAULT_TTL_S
        self._session, self._valid_until = token, started + ttl
        self.account, self.role = str(body.get("account", "")), str(body.get("role", ""))
        return token

    async def token(self) -> str:
        """A session valid for a minute more at least ("" when the coordinator wants none)."""
        if self.required is None or time.monotonic() > self._valid_until - 60:
            await self.refresh()
        return self._session

    async def headers(self) -> dict[str, str]:
        """The ``Authorization`` header for a request starting now (none when auth is off)."""
        token = await self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def middleware(
        self,
        request: aiohttp.ClientRequest,
        handler: Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]],
    ) -> aiohttp.ClientResponse:
        """aiohttp client middleware: each request carries a session valid when it starts, so a
        client session that lives long (a download of many fragments) never sends an expired one."""
        request.headers.update(await self.headers())
        return await handler(request)

    def hello(self) -> dict[str, str]:
        """The hello's ``session`` field (call ``refresh`` once before the first connect)."""
        token = self._session
        if self._next is None or self._next.done():
            self._next = asyncio.create_task(self._fetch_next(), name="session-refresh")
        return {"session": token} if token else {}

    async def _fetch_next(self) -> None:
        try:
            await self.refresh()
        except KlusterError as exc:  # the coordinator may be restarting: the next hello tries again
            log.info("could not renew the session: %s", exc)

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._next
