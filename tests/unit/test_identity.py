"""Peer identity: key files, self-certifying ids, and what the SDP signature covers."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from aiortc import RTCPeerConnection
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.errors import ConfigError, IdentityError, ProtocolError
from engine.transport.identity import (
    Identity,
    check_hello,
    check_sdp,
    default_node_identity_path,
    hello_proof,
    key_id,
    key_id_of,
    sdp_fingerprints,
    sign_sdp,
    verify,
)

FP256 = "sha-256 " + ":".join(["AB"] * 32)


async def _real_sdp() -> str:
    """An offer exactly as our links send them: one data channel, candidates gathered."""
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("kluster")
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


def _swap_fingerprints(sdp: str, other: str) -> str:
    """``sdp`` with its fingerprint lines replaced by those of ``other`` (a relay's substitution)."""
    theirs = [line for line in other.splitlines() if line.startswith("a=fingerprint:")]
    lines = [line for line in sdp.splitlines() if not line.startswith("a=fingerprint:")]
    return "\r\n".join(lines + theirs) + "\r\n"


# -- ids ------------------------------------------------------------------------------------------


def test_key_id_is_26_base32_chars_derived_from_the_public_key() -> None:
    a, b = Identity.ephemeral(), Identity.ephemeral()
    assert re.fullmatch(r"[a-z2-7]{26}", a.id)
    assert a.id == key_id(a.public_key) != b.id
    assert a.peer_id("n") == f"n-{a.id}" and a.peer_id("client7") == f"client7-{a.id}"
    assert key_id_of(a.peer_id("n")) == a.id
    with pytest.raises(ConfigError):
        a.peer_id("N")


@pytest.mark.parametrize(
    "peer_id", ["a", "echo", "n-", "-x", "N-" + "a" * 26, "n-" + "a" * 25, "n-" + "a" * 27, "n-" + "1" * 26, ""]
)
def test_ids_that_name_no_key(peer_id: str) -> None:
    assert key_id_of(peer_id) is None


def test_sign_and_verify() -> None:
    a, b = Identity.ephemeral(), Identity.ephemeral()
    sig = a.sign(b"message")
    assert verify(a.public_key, sig, b"message")
    assert not verify(a.public_key, sig, b"messagE")
    assert not verify(b.public_key, sig, b"message")
    assert not verify(a.public_key, bytes(64), b"message")
    assert not verify(b"short", sig, b"message")


# -- fingerprints ---------------------------------------------------------------------------------


async def test_fingerprints_of_a_real_aiortc_sdp() -> None:
    sdp = await _real_sdp()
    fps = sdp_fingerprints(sdp)
    assert [f.split()[0] for f in fps] == ["sha-256", "sha-384", "sha-512"]  # what aiortc 1.16 offers
    for fp in fps:
        assert f"a=fingerprint:{fp}" in sdp
    assert sdp_fingerprints(sdp) != sdp_fingerprints(await _real_sdp())  # a fresh certificate per connection


def test_fingerprints_are_normalized_like_aiortc_compares_them() -> None:
    lower = "a=fingerprint:SHA-256  " + ":".join(["ab"] * 32)
    sdp = f"v=0\r\n{lower}\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=fingerprint:{FP256}\r\n"
    assert sdp_fingerprints(sdp) == (FP256,)  # session and media level, deduplicated
    assert sdp_fingerprints("v=0\r\na=fingerprint-x:y z\r\n a=fingerprint:sha-1 AA\r\n") == ()
    with pytest.raises(ProtocolError, match="malformed fingerprint"):
        sdp_fingerprints("v=0\r\na=fingerprint:sha-256\r\n")
    # Every line break aiortc's parser honours (str.splitlines) is honoured here too.
    assert sdp_fingerprints(f"v=0\x0ba=fingerprint:{FP256}") == (FP256,)


# -- the SDP signature ----------------------------------------------------------------------------


async def test_a_signed_sdp_verifies_and_every_tampering_fails() -> None:
    alice, bob, mallory = Identity.ephemeral(), Identity.ephemeral(), Identity.ephemeral()
    a, b = alice.peer_id("n"), bob.peer_id("c")
    sdp = await _real_sdp()
    signal = {"type": "answer", "link": "l1", "sdp": sdp, **sign_sdp(alice, "answer", "l1", a, b, sdp)}
    check_sdp(signal, "answer", "l1", a, b, sdp)  # untouched: passes

    def fails(match: str, **changes: object) -> None:
        args = {"signal": signal, "kind": "answer", "link_id": "l1", "sender": a, "receiver": b, "sdp": sdp}
        args.update(changes)
        with pytest.raises(IdentityError, match=match) as err:
            check_sdp(**args)  # type: ignore[arg-type]
        assert str(err.value).startswith(f"peer {args['sender']} failed identity check: ")

    swapped = _swap_fingerprints(sdp, await _real_sdp())
    fails("signature does not cover", sdp=swapped)  # a relay put another certificate's fingerprint in
    fails("signature does not cover", sdp=sdp.replace("a=setup", f"a=fingerprint:{FP256}\r\na=setup"))  # added one
    dropped = "\r\n".join(line for line in sdp.splitlines() if not line.startswith("a=fingerprint:sha-512"))
    fails("signature does not cover", sdp=dropped)  # removed one
    fails("no DTLS fingerprint", sdp=_swap_fingerprints(sdp, ""))
    fails("signature does not cover", link_id="l2")  # replayed into another link
    fails("signature does not cover", receiver=mallory.peer_id("c"))  # replayed towards someone else
    fails("signature does not cover", kind="offer")  # an answer passed off as an offer
    fails("key does not match its peer id", sender=mallory.peer_id("n"))  # relay claims another sender
    fails("does not name a key", sender="alice")
    # Mallory's own key and a valid signature over the swapped fingerprints: her key derives another id.
    forged = {**signal, **sign_sdp(mallory, "answer", "l1", a, b, swapped)}
    fails("key does not match its peer id", signal=forged, sdp=swapped)
    fails("no valid identity key", signal={"sig": signal["sig"]})
    fails("no valid identity key", signal={**signal, "key": "not base64!"})
    fails("no valid identity key", signal={**signal, "key": signal["sig"]})  # 64 bytes, not 32
    fails("no valid signature", signal={**signal, "sig": None})
    fails("malformed fingerprint", sdp=sdp + "a=fingerprint:sha-256\r\n")


def test_hello_proof_binds_the_nonce_and_the_role() -> None:
    me = Identity.ephemeral()
    sig = me.sign_b64(hello_proof("node", "nonce-1"))
    assert check_hello(me.public_b64, sig, "node", "nonce-1") == me.public_key
    for role, nonce in (("node", "nonce-2"), ("client", "nonce-1")):
        with pytest.raises(IdentityError, match="does not verify"):
            check_hello(me.public_b64, sig, role, nonce)
    with pytest.raises(IdentityError, match="does not verify"):  # someone else's key with my signature
        check_hello(Identity.ephemeral().public_b64, sig, "node", "nonce-1")
    with pytest.raises(IdentityError, match="no valid identity key"):
        check_hello(None, sig, "node", "nonce-1")


# -- key files ------------------------------------------------------------------------------------


def test_key_file_is_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "node.key"
    first = Identity.load_or_create(path)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600
    again = Identity.load_or_create(path)
    assert again.id == first.id and again.public_key == first.public_key
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.key"]  # no temporary file left


def test_processes_starting_together_share_one_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    ids: list[str] = []
    barrier = threading.Barrier(6)

    def load() -> None:
        barrier.wait()
        ids.append(Identity.load_or_create(path).id)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 6 and len(set(ids)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a PEM private key"),
        (b"garbage\n", "not a PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "cannot use identity key"),
    ],
)
def test_a_corrupt_key_file_is_one_clear_error_and_left_alone(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        Identity.load_or_create(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == content  # never silently replaced: that would change the peer id


def test_a_key_of_another_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    with pytest.raises(ConfigError, match="not an ed25519 key"):
        Identity.load_or_create(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    Identity.load_or_create(path)
    path.chmod(0)
    with pytest.raises(ConfigError, match="Permission denied"):
        Identity.load_or_create(path)


def test_a_key_path_that_is_a_directory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot use identity key {tmp_path}: Is a directory"):
        Identity.load_or_create(tmp_path)


def test_default_key_paths_differ_per_node_name() -> None:
    paths = {default_node_identity_path(n) for n in ("node-1", "node-2", "a/b", "a_b", "")}
    assert len(paths) == 5
    assert default_node_identity_path("node-1").name == "node-node-1.key"


def test_kluster_node_with_a_corrupt_identity_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import main

    bad = tmp_path / "node.key"
    bad.write_text("not a key\n")
    code = main(["node", "--coordinator", "http://127.0.0.1:9", "--name", "x", "--identity", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("kluster: error: cannot use identity key") and str(bad) in err[0]
