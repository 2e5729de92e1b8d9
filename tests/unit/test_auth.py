"""Session tokens and accounts: the attacks a JWT verifier must refuse, the replay cache, the store.

Every forged token here is built with ``encode_token`` (a correct HMAC-SHA256 over what the test
chooses), so each case fails for the reason it names and not for a broken signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from engine.coordinator.accounts import AccountStore
from engine.coordinator.auth import (
    ACCOUNT,
    AUDIENCE,
    REQUIRED_CLAIMS,
    AuthBusyError,
    AuthError,
    AuthGate,
    Claims,
    ForbiddenError,
    RateLimitedError,
    ReplayCache,
    encode_token,
    issue_session,
    load_account_token,
    load_session_secret,
    verify_session,
)
from engine.coordinator.ratelimit import Limit, RateLimits
from engine.errors import ConfigError

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def _claims(**over: Any) -> dict[str, Any]:
    base = {
        "sub": "alice",
        "role": "supplier",
        "aud": AUDIENCE,
        "iat": int(NOW),
        "exp": int(NOW + 600),
        "jti": "j" * 22,
        "nonce": "n" * 32,
    }
    base.update(over)
    return base


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _verify(token: str, now: float = NOW) -> Any:
    return verify_session(token, SECRET, now=now)


def test_an_issued_session_verifies_with_its_claims() -> None:
    token = issue_session(SECRET, "alice", "developer", "n" * 32, now=NOW, ttl_s=600)
    claims = _verify(token)
    assert (claims.sub, claims.role, claims.aud, claims.nonce) == ("alice", "developer", AUDIENCE, "n" * 32)
    assert claims.exp == NOW + 600 and claims.iat == NOW and len(claims.jti) >= 16
    assert issue_session(SECRET, "alice", "developer", "n" * 32, now=NOW) != token  # a fresh jti each time


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_is_refused(alg: str) -> None:
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    for token in (f"{head}.{body}.", f"{head}.{body}.{_b64(b'x')}"):
        with pytest.raises(AuthError, match=r"algorithm .* is not accepted"):
            _verify(token)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "HS512", "HS384", "hs256", "EdDSA"])
def test_algorithm_confusion_is_refused_even_with_a_valid_hmac(alg: str) -> None:
    # The classic confusion attack: a token declaring an asymmetric algorithm, "signed" with HMAC
    # keyed by what the server would use as the public key. Here the key is the real secret, so
    # the HMAC is right: only the fixed algorithm list can refuse it.
    token = encode_token({"alg": alg, "typ": "JWT"}, _claims(), SECRET)
    with pytest.raises(AuthError, match=r"algorithm .* is not accepted"):
        _verify(token)


@pytest.mark.parametrize("header", [{}, {"alg": ["HS256"]}, {"alg": None}, {"alg": "HS256", "crit": ["exp"]}])
def test_odd_headers_are_refused(header: dict[str, Any]) -> None:
    with pytest.raises(AuthError):
        _verify(encode_token(header, _claims(), SECRET))


def test_expired_tokens_are_refused_after_the_leeway() -> None:
    token = encode_token({"alg": "HS256"}, _claims(iat=int(NOW) - 600, exp=int(NOW) - 5), SECRET)
    assert _verify(token).sub == "alice"  # 5 s late: within the 10 s leeway
    with pytest.raises(AuthError, match="expired 11 s ago"):
        _verify(token, now=NOW + 6)


def test_a_token_issued_in_the_future_or_living_too_long_is_refused() -> None:
    with pytest.raises(AuthError, match="impossible issue time"):
        _verify(encode_token({"alg": "HS256"}, _claims(iat=int(NOW) + 60, exp=int(NOW) + 600), SECRET))
    with pytest.raises(AuthError, match="impossible issue time"):
        _verify(encode_token({"alg": "HS256"}, _claims(exp=int(NOW) + 10 * 86_400), SECRET))


@pytest.mark.parametrize("aud", ["kluster-node", "", ["kluster-coordinator"], None, "KLUSTER-COORDINATOR"])
def test_a_wrong_audience_is_refused(aud: Any) -> None:
    with pytest.raises(AuthError, match="another audience"):
        _verify(encode_token({"alg": "HS256"}, _claims(aud=aud), SECRET))


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_every_required_claim_is_required(claim: str) -> None:
    payload = _claims()
    del payload[claim]
    with pytest.raises(AuthError, match=f"lacks the claim.*{claim}"):
        _verify(encode_token({"alg": "HS256"}, payload, SECRET))


@pytest.mark.parametrize("claim,value", [("exp", "soon"), ("exp", True), ("iat", None), ("sub", 7), ("jti", "")])
def test_claims_of_the_wrong_type_are_refused(claim: str, value: Any) -> None:
    with pytest.raises(AuthError):
        _verify(encode_token({"alg": "HS256"}, _claims(**{claim: value}), SECRET))


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(AuthError, match="unknown role"):
        _verify(encode_token({"alg": "HS256"}, _claims(role="root"), SECRET))


def test_tampering_breaks_the_signature() -> None:
    token = issue_session(SECRET, "alice", "supplier", "n" * 32, now=NOW)
    head, body, sig = token.split(".")
    promoted = _b64(json.dumps(_claims(role="admin")).encode())
    with pytest.raises(AuthError, match="signature does not verify"):
        _verify(f"{head}.{promoted}.{sig}")
    flipped = _b64(bytes([base64.urlsafe_b64decode(sig + "=")[0] ^ 1]) + base64.urlsafe_b64decode(sig + "=")[1:])
    with pytest.raises(AuthError, match="signature does not verify"):
        _verify(f"{head}.{body}.{flipped}")
    with pytest.raises(AuthError, match="signature does not verify"):
        _verify(encode_token({"alg": "HS256"}, _claims(), b"another secret of 32 characters!"))


def test_the_signature_covers_the_exact_bytes_received() -> None:
    token = issue_session(SECRET, "alice", "supplier", "n" * 32, now=NOW)
    head, body, sig = token.split(".")
    # Same JSON, other encoding: padding, or a re-serialised header with the same meaning.
    with pytest.raises(AuthError):
        _verify(f"{head}==.{body}.{sig}")
    respaced = _b64(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
    with pytest.raises(AuthError, match="signature does not verify"):
        _verify(f"{respaced}.{body}.{sig}")


@pytest.mark.parametrize(
    "token",
    ["", "a.b", "a.b.c.d", "!!.e30.", "e30.e30.e30", f"{_b64(b'[1]')}.e30.", "x" * 5000, "e30.bm90IGpzb24.AA"],
)
def test_malformed_tokens_are_refused_with_a_reason(token: str) -> None:
    with pytest.raises(AuthError) as info:
        _verify(token)
    assert "\n" not in str(info.value)


def test_our_hmac_is_plain_hs256() -> None:
    # Interoperability: what any JWT library computes for HS256.
    token = encode_token({"alg": "HS256", "typ": "JWT"}, _claims(), SECRET)
    head, body, sig = token.split(".")
    expected = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert sig == _b64(expected)


# ------------------------------------------------------------------ replay cache


def test_the_replay_cache_remembers_keys_until_they_expire() -> None:
    cache = ReplayCache(max_entries=3)
    assert not cache.seen("a", until=10.0, now=0.0)
    assert cache.seen("a", until=10.0, now=5.0)  # replayed within its lifetime
    assert not cache.seen("a", until=20.0, now=10.0)  # expired: forgotten, remembered anew
    assert not cache.seen("b", until=30.0, now=10.0)
    assert not cache.seen("c", until=15.0, now=10.0)
    with pytest.raises(AuthBusyError):  # full: refuse rather than forget live entries
        cache.seen("d", until=30.0, now=11.0)
    assert not cache.seen("d", until=40.0, now=16.0)  # "c" expired, room again
    assert len(cache) == 3


# ------------------------------------------------------------------ accounts


@pytest.fixture
def store(tmp_path: Path) -> AccountStore:
    return AccountStore(tmp_path / "acc" / "accounts.sqlite3")


def test_tokens_are_stored_only_as_hashes(store: AccountStore, tmp_path: Path) -> None:
    token = store.add("alice", "supplier")
    assert token.startswith("kt1_") and len(token) == 47
    account = store.authenticate(token)
    assert account is not None and (account.name, account.role, account.disabled) == ("alice", "supplier", False)
    raw = (tmp_path / "acc" / "accounts.sqlite3").read_bytes()
    assert token.encode() not in raw and token[4:].encode() not in raw
    assert (tmp_path / "acc" / "accounts.sqlite3").stat().st_mode & 0o077 == 0
    assert store.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.authenticate("not a token") is None


def test_accounts_are_unique_named_and_typed(store: AccountStore) -> None:
    store.add("alice", "supplier")
    with pytest.raises(ConfigError, match="exists already"):
        store.add("alice", "developer")
    with pytest.raises(ConfigError, match="role must be"):
        store.add("bob", "root")
    with pytest.raises(ConfigError, match="account name"):
        store.add("-bob", "developer")
    with pytest.raises(ConfigError, match="no account"):
        store.set_disabled("nobody")


def test_disabling_and_recording_nodes(store: AccountStore) -> None:
    token = store.add("alice", "supplier")
    store.add("bob", "developer")
    assert store.active_count() == 2
    assert store.set_disabled("alice").disabled
    account = store.authenticate(token)
    assert account is not None and account.disabled  # found, and the caller says why it refuses
    assert store.active_count() == 1
    store.record_node("n-abc", "gpu-1", "alice")
    store.record_node("n-abc", "gpu-1", "carol")
    assert store.node_account("n-abc") == "carol"
    assert [a.name for a in store.accounts()] == ["alice", "bob"]


def test_a_corrupt_accounts_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "accounts.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot open the accounts file"):
        AccountStore(path)


# ------------------------------------------------------------------ the gate's checks


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _gate(store: AccountStore, clock: Clock, enabled: bool = True, limits: RateLimits | None = None) -> AuthGate:
    return AuthGate(store, enabled=enabled, secret=SECRET, limits=limits, clock=clock, monotonic=clock)


def test_hellos_need_the_right_role_and_a_fresh_session(store: AccountStore) -> None:
    clock = Clock()
    gate = _gate(store, clock)
    store.add("alice", "supplier")
    store.add("dev", "developer")
    store.add("root", "admin")

    def session(sub: str, role: str) -> str:
        return issue_session(SECRET, sub, role, "n" * 32, now=clock.now)

    assert gate.check_hello({"session": session("alice", "supplier")}, "node") == "alice"
    assert gate.check_hello({"session": session("root", "admin")}, "node") == "root"
    assert gate.check_hello({"session": session("dev", "developer")}, "client") == "dev"
    with pytest.raises(ForbiddenError, match="a developer account cannot register a node"):
        gate.check_hello({"session": session("dev", "developer")}, "node")
    with pytest.raises(ForbiddenError, match="a supplier account cannot connect as a client"):
        gate.check_hello({"session": session("alice", "supplier")}, "client")
    with pytest.raises(AuthError, match="no session token"):
        gate.check_hello({}, "node")
    used = session("alice", "supplier")
    gate.check_hello({"session": used}, "node")
    with pytest.raises(AuthError, match="replayed jti"):
        gate.check_hello({"session": used}, "node")
    clock.now += 3600  # long after it expired, the jti is forgotten, and the token is refused as expired
    with pytest.raises(AuthError, match="expired"):
        gate.check_hello({"session": used}, "node")


def test_a_disabled_account_loses_its_live_sessions(store: AccountStore) -> None:
    clock = Clock()
    gate = _gate(store, clock)
    store.add("alice", "supplier")
    token = issue_session(SECRET, "alice", "supplier", "n" * 32, now=clock.now)
    store.set_disabled("alice")
    with pytest.raises(AuthError, match="disabled or gone"):
        gate.check_hello({"session": token}, "node")


def test_sessions_from_another_coordinator_are_refused(store: AccountStore) -> None:
    store.add("alice", "supplier")
    token = issue_session(b"o" * 32, "alice", "supplier", "n" * 32, now=NOW)  # e.g. before a restart
    with pytest.raises(AuthError, match="signature"):
        _gate(store, Clock()).check_hello({"session": token}, "node")


def test_with_auth_off_hellos_pass_and_accounts_are_not_asked(store: AccountStore) -> None:
    assert _gate(store, Clock(), enabled=False).check_hello({}, "node") is None


def test_hellos_count_against_the_account_rate_limit(store: AccountStore) -> None:
    clock = Clock()
    gate = _gate(store, clock, limits=RateLimits(per_ip=None, per_account=Limit(1.0, 2.0)))
    store.add("alice", "supplier")
    for _ in range(2):
        gate.check_hello({"session": issue_session(SECRET, "alice", "supplier", "n" * 32, now=clock.now)}, "node")
    with pytest.raises(RateLimitedError) as info:
        gate.check_hello({"session": issue_session(SECRET, "alice", "supplier", "n" * 32, now=clock.now)}, "node")
    assert info.value.retry_after_s == pytest.approx(1.0)


def test_spot_checks_spend_a_budget_of_positions_per_account_or_address(store: AccountStore) -> None:
    clock = Clock()
    gate = _gate(store, clock, limits=RateLimits(audit_positions=Limit(100.0, 1000.0)))
    alice, bob = make_mocked_request("POST", "/v1/audit"), make_mocked_request("POST", "/v1/audit")
    alice[ACCOUNT] = Claims("alice", "developer", NOW + 60, NOW, "j", "n")
    bob[ACCOUNT] = Claims("bob", "developer", NOW + 60, NOW, "j", "n")
    gate.charge_audit(alice, 700)
    with pytest.raises(RateLimitedError, match="account 'alice' are over their budget") as info:
        gate.charge_audit(alice, 700)
    assert info.value.retry_after_s == pytest.approx(4.0)
    gate.charge_audit(bob, 700)  # another account's checks are not held up
    clock.now += 4.0
    gate.charge_audit(alice, 700)
    anonymous = make_mocked_request("POST", "/v1/audit")  # auth off: keyed by address
    gate.charge_audit(anonymous, 1000)
    with pytest.raises(RateLimitedError, match="this address"):
        gate.charge_audit(anonymous, 1)
    _gate(store, clock, limits=RateLimits(audit_positions=None)).charge_audit(anonymous, 10**6)  # 'off'


# ------------------------------------------------------------------ secrets and token files


def test_session_secrets_come_from_a_file_the_environment_or_chance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLUSTER_SESSION_SECRET", raising=False)
    one, source = load_session_secret(None)
    assert len(one) == 32 and source.startswith("random") and load_session_secret(None)[0] != one
    monkeypatch.setenv("KLUSTER_SESSION_SECRET", "e" * 40)
    assert load_session_secret(None)[0] == b"e" * 40
    path = tmp_path / "secret"
    path.write_text("f" * 32 + "\nignored\n")
    assert load_session_secret(path) == (b"f" * 32, str(path))
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 32 characters"):
        load_session_secret(path)
    with pytest.raises(ConfigError, match="cannot read the session secret file"):
        load_session_secret(tmp_path / "missing")


def test_account_tokens_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLUSTER_TOKEN", raising=False)
    assert load_account_token(None) is None
    monkeypatch.setenv("KLUSTER_TOKEN", " kt1_x \n")
    assert load_account_token(None) == "kt1_x"
    path = tmp_path / "token"
    path.write_text("kt1_y\n")
    assert load_account_token(path) == "kt1_y"
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_account_token(path)


def test_the_store_file_is_sqlite_with_no_token_column(store: AccountStore) -> None:
    store.add("alice", "supplier")
    db = sqlite3.connect(store.path)
    columns = {row[1] for row in db.execute("PRAGMA table_info(accounts)")}
    db.close()
    assert columns == {"name", "role", "token_hash", "created", "disabled"}
