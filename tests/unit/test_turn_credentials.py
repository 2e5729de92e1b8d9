"""TURN REST credentials (coturn ``use-auth-secret``) and the coordinator's STUN/TURN options."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from engine.coordinator.turn import (
    DEFAULT_TTL_S,
    SECRET_ENV,
    TurnConfig,
    build_ice_config,
    check_url,
    load_secret,
    mint,
)
from engine.errors import ConfigError

NOW = 1_700_000_000.75


def test_known_answer_vector() -> None:
    cred = mint("north-wind-7", "n-0123456789ab", ttl_s=3600, now=NOW)
    assert cred.username == "1700003600:n-0123456789ab"
    assert cred.expires_at == 1_700_003_600
    # Computed once by hand with hmac/hashlib/base64 and frozen here...
    assert cred.credential == "iFLuS+ZWKAZP2zpyYdAG76V8vgo="
    # ...and the definition it comes from: base64(HMAC-SHA1(secret, username)).
    digest = hmac.new(b"north-wind-7", b"1700003600:n-0123456789ab", hashlib.sha1).digest()
    assert cred.credential == base64.b64encode(digest).decode()


def test_expiry_is_whole_unix_seconds_now_plus_ttl() -> None:
    assert mint("s", "peer", now=NOW).username == f"{1_700_000_000 + DEFAULT_TTL_S}:peer"
    assert DEFAULT_TTL_S == 3600
    # A negative TTL gives an already expired credential (what the relay test needs).
    past = mint("s", "peer", ttl_s=-60, now=NOW)
    assert past.expires_at == 1_699_999_940
    assert past.username.split(":") == ["1699999940", "peer"]


def test_bytes_and_str_secrets_agree_and_secrets_differ() -> None:
    assert mint("k", "p", now=NOW) == mint(b"k", "p", now=NOW)
    assert mint("k", "p", now=NOW).credential != mint("k2", "p", now=NOW).credential


def test_user_must_not_contain_the_separator() -> None:
    with pytest.raises(ValueError, match="must not contain ':'"):
        mint("s", "a:b")


def test_credentials_never_show_in_reprs() -> None:
    cred = mint("topsecret", "peer", now=NOW)
    assert cred.credential not in repr(cred)
    assert "topsecret" not in repr(TurnConfig(("turn:t:3478",), "topsecret"))


def test_each_peer_gets_its_own_credential() -> None:
    turn = TurnConfig(("turn:10.0.0.9:3478?transport=udp", "turn:10.0.0.9:3478?transport=tcp"), "sec", ttl_s=600)
    a, b = turn.server_for("n-a", now=NOW), turn.server_for("n-b", now=NOW)
    assert a["urls"] == ["turn:10.0.0.9:3478?transport=udp", "turn:10.0.0.9:3478?transport=tcp"]
    assert a["username"] == "1700000600:n-a" and b["username"] == "1700000600:n-b"
    assert a["credential"] == mint("sec", "n-a", ttl_s=600, now=NOW).credential != b["credential"]


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("stun:stun.example.org", "stun"),
        ("stun:10.1.2.3:3478", "stun"),
        ("turn:turn.example.org:3478?transport=udp", "turn"),
        ("turn:10.1.2.3", "turn"),
        ("turn:[2001:db8::1]:3478?transport=tcp", "turn"),
        ("turns:turn.example.org:5349?transport=tcp", "turn"),
    ],
)
def test_good_urls(url: str, kind: str) -> None:
    assert check_url(url, kind) == url


@pytest.mark.parametrize(
    ("url", "kind", "message"),
    [
        ("turn.example.org:3478", "turn", "is not a TURN URL"),
        ("stun:x:3478", "turn", "is not a TURN URL"),
        ("turn:x:3478?transport=sctp", "turn", "is not a TURN URL"),
        ("turn:x:99999", "turn", "port must be 1-65535"),
        ("turns:x:5349?transport=udp", "turn", "needs transport=tcp"),
        ("http://stun.example.org", "stun", "is not a STUN URL"),
        ("stun:", "stun", "is not a STUN URL"),
    ],
)
def test_bad_urls_are_one_line_config_errors(url: str, kind: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_url(url, kind)


def test_secret_from_file_then_env(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file\nignored\n")
    assert load_secret(path, {SECRET_ENV: "from-env"}) == "from-file"
    assert load_secret(None, {SECRET_ENV: " from-env \n"}) == "from-env"
    assert load_secret(None, {}) is None


def test_bad_secret_sources_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the TURN secret file"):
        load_secret(tmp_path / "missing", {})
    (tmp_path / "empty").write_text("\n\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_secret(tmp_path / "empty", {})
    with pytest.raises(ConfigError, match=f"{SECRET_ENV} is set but empty"):
        load_secret(None, {SECRET_ENV: "  "})


def test_build_ice_config() -> None:
    static, turn = build_ice_config(stun_urls=["stun:s:3478"])
    assert static == ({"urls": "stun:s:3478"},) and turn is None
    static, turn = build_ice_config(turn_urls=["turn:t:3478"], secret="k", ttl_s=120)
    assert static == () and turn == TurnConfig(("turn:t:3478",), "k", 120)
    with pytest.raises(ConfigError, match="--turn needs the TURN server's shared secret"):
        build_ice_config(turn_urls=["turn:t:3478"])
    for ttl in (59, 8 * 24 * 3600, float("nan")):
        with pytest.raises(ConfigError, match="--turn-ttl must be between 60 and 604800"):
            build_ice_config(turn_urls=["turn:t:3478"], secret="k", ttl_s=ttl)
