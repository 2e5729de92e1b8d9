"""STUN/TURN servers the coordinator hands to peers, with short-lived TURN credentials.

Why short-lived credentials: a TURN relay forwards anyone's traffic, so its credentials are worth
stealing; every peer receives them, and a peer is not trusted. With the "TURN REST API" scheme
(coturn's ``use-auth-secret``) the coordinator and the TURN server share one secret and nothing
else: the username is ``<expiry unix time>:<user>`` and the password is
``base64(HMAC-SHA1(secret, username))``. The TURN server recomputes the HMAC and refuses an
expired username (401), so a leaked credential stops working after its TTL, no user database is
kept in step, and each credential names the peer it was given to (the user part is the peer id,
visible in the TURN server's log).

Measured with coturn 4.6.1, aiortc 1.16 and aioice 0.13 between network namespaces whose direct
path is dropped (tests/wan/test_turn_relay.py):

* Nothing special is needed on the peers: TURN over UDP, no forced relay policy. Each side gathers
  a relay candidate (an allocation: one 401 for the nonce, then success, ~2 ms on a LAN), ICE
  finds the host<->relay pair, and a relayed link opens in 0.1-0.6 s on an unshaped LAN.
* coturn checks the expiry when an allocation is *created*; an allocation made in time keeps
  working past the expiry (refreshes and stale-nonce renewals go on; seen with a 2 s credential
  and 3 s allocation lifetime), so a credential only has to be valid when a link is opened. The
  coordinator pushes fresh ones every ``ttl/2`` (an ``ice_servers`` message) so links opened
  hours after a peer connected still get a relay.
* An expired credential gets 401 from coturn, which aioice swallows: the link simply has no relay
  candidate, and where the direct path is blocked it fails with the connect timeout. coturn's log
  ("Cannot find credentials of user <expiry:peer>", "error 401") is where the cause shows.
* An unreachable TURN server costs each side aioice's full 5 s gathering cap, so a link takes
  ~10 s to open (as long as PeerManager's default connect timeout): keep the TURN server up or
  leave it out.
* aiortc uses the *first* ``stun:`` and the *first* ``turn:``/``turns:`` URL it is given and
  ignores the rest; list the preferred one first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

log = logging.getLogger(__name__)

#: Default lifetime of a minted credential: long enough for any connect, short enough that a
#: leaked one is useless soon.
DEFAULT_TTL_S = 3600
#: Bounds of the configurable lifetime. Below a minute a peer could be handed a credential that
#: expires before its connect finishes (refreshes come every ttl/2); above a week it is no longer
#: short-lived.
MIN_TTL_S = 60
MAX_TTL_S = 7 * 24 * 3600
#: Environment variable holding the TURN shared secret (or use a secret file): never a plain
#: command-line argument, which every local user can read in the process list.
SECRET_ENV = "KLUSTER_TURN_SECRET"

_HOST = r"(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)"
_PORT = r"(?::(?P<port>[0-9]{1,5}))?"
_STUN_RE = re.compile(rf"stuns?:{_HOST}{_PORT}")
_TURN_RE = re.compile(rf"(?P<scheme>turns?):{_HOST}{_PORT}(?:\?transport=(?P<transport>udp|tcp))?")


@dataclass(frozen=True, slots=True)
class TurnCredential:
    """One minted TURN REST credential."""

    username: str
    credential: str = field(repr=False)
    #: Unix time after which the TURN server refuses it.
    expires_at: int


def mint(secret: str | bytes, user: str, *, ttl_s: float = DEFAULT_TTL_S, now: float | None = None) -> TurnCredential:
    """A credential for ``user`` that the TURN server accepts until ``now + ttl_s``.

    ``ttl_s`` may be negative (an already expired credential, for tests). ``user`` must not
    contain ``:``, the separator coturn splits the username at.
    """
    if ":" in user:
        raise ValueError(f"TURN user {user!r} must not contain ':'")
    key = secret.encode() if isinstance(secret, str) else secret
    expires_at = int((time.time() if now is None else now) + ttl_s)
    username = f"{expires_at}:{user}"
    digest = hmac.new(key, username.encode(), hashlib.sha1).digest()
    return TurnCredential(username=username, credential=base64.b64encode(digest).decode("ascii"), expires_at=expires_at)


def check_url(url: str, kind: str) -> str:
    """``url`` if it is a STUN (``kind="stun"``) or TURN URL aiortc can use, else ConfigError.

    STUN: ``stun:host[:port]``. TURN: ``turn:host[:port][?transport=udp|tcp]`` or
    ``turns:host[:port]?transport=tcp`` (aiortc has no TURN over DTLS; it drops such a URL silently,
    so it is refused here instead).
    """
    pattern = _STUN_RE if kind == "stun" else _TURN_RE
    match = pattern.fullmatch(url)
    if match is None:
        example = "stun:stun.example.org:3478" if kind == "stun" else "turn:turn.example.org:3478?transport=udp"
        raise ConfigError(f"--{kind} {url!r} is not a {kind.upper()} URL (e.g. {example})")
    port = match.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        raise ConfigError(f"--{kind} {url!r}: port must be 1-65535")
    if kind == "turn" and match.group("scheme") == "turns" and match.group("transport") == "udp":
        raise ConfigError(f"--turn {url!r}: turns: (TLS) needs transport=tcp")
    return url


def load_secret(secret_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The TURN shared secret from ``secret_file`` (first line), else from :data:`SECRET_ENV`; None if neither.

    Raises ConfigError for an unreadable or empty file, or an empty variable.
    """
    if secret_file is not None:
        try:
            text = secret_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the TURN secret file {secret_file}: {exc}") from None
        lines = text.strip().splitlines()
        secret = lines[0].strip() if lines else ""
        if not secret:
            raise ConfigError(f"the TURN secret file {secret_file} is empty")
        return secret
    env = os.environ if environ is None else environ
    if SECRET_ENV in env:
        secret = env[SECRET_ENV].strip()
        if not secret:
            raise ConfigError(f"{SECRET_ENV} is set but empty")
        return secret
    return None


@dataclass(frozen=True)
class TurnConfig:
    """TURN servers sharing one secret with the coordinator; each peer gets its own credential."""

    urls: tuple[str, ...]
    secret: str = field(repr=False)
    ttl_s: int = DEFAULT_TTL_S

    def server_for(self, peer_id: str, now: float | None = None) -> dict[str, Any]:
        """The RTCIceServer dict (``urls``, ``username``, ``credential``) minted for ``peer_id``."""
        cred = mint(self.secret, peer_id, ttl_s=self.ttl_s, now=now)
        return {"urls": list(self.urls), "username": cred.username, "credential": cred.credential}


def build_ice_config(
    *,
    stun_urls: Sequence[str] = (),
    turn_urls: Sequence[str] = (),
    secret: str | None = None,
    ttl_s: float = DEFAULT_TTL_S,
) -> tuple[tuple[dict[str, Any], ...], TurnConfig | None]:
    """Validate the coordinator's STUN/TURN options: (static ice_servers, TurnConfig or None).

    Every mistake is a one-line ConfigError naming the option.
    """
    static = tuple({"urls": check_url(url, "stun")} for url in stun_urls)
    turn_urls = tuple(check_url(url, "turn") for url in turn_urls)
    if not turn_urls:
        return static, None
    if secret is None:
        raise ConfigError(f"--turn needs the TURN server's shared secret: set {SECRET_ENV} or --turn-secret-file")
    if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise ConfigError(f"--turn-ttl must be between {MIN_TTL_S} and {MAX_TTL_S} seconds, got {ttl_s:g}")
    if len(turn_urls) > 1:
        log.info(
            "aiortc peers use only the first TURN URL (%s); the others are fallbacks for other clients", turn_urls[0]
        )
    return static, TurnConfig(urls=turn_urls, secret=secret, ttl_s=int(ttl_s))
