"""Peer identity: a long-term ed25519 key per node (one per process for clients) that signs the
DTLS fingerprints of every SDP offer and answer the peer sends.

Why. WebRTC's DTLS handshake only proves that the other end holds the certificate whose
fingerprint is in the SDP we received, and SDPs travel through the signaling relay (the
coordinator). A relay, or anyone able to rewrite its messages, could swap the fingerprint for its
own and sit in the middle of every link: DTLS would succeed against the attacker. So each peer
signs, with its long-term key, a binding of

* the DTLS fingerprints in the SDP it sends (all of them, session and media level),
* the link id, the sender's peer id and the intended receiver's peer id (a signed answer cannot be
  replayed into another link or towards someone else),

and the receiver checks the signature over the fingerprints actually present in the SDP it got.
Peer ids are self-certifying: ``<role tag>-<key id>``, where the key id is derived from the public
key (:func:`key_id`), so the key that signed must also be the one the id in the route names; an
attacker substituting its own key and signature is caught because its key derives another id.

Residual risks, not addressed here: the coordinator chooses which peer ids a route contains, so a
malicious coordinator can route a client through nodes it runs itself (they hold their own keys
and pass every check); this proves "the peer you connect to holds the key of the id you asked
for", not "that id is an honest node". The signature does not cover ICE candidates or the DTLS
role, so a relay can still break links (denial of service) but not read or alter their contents.
A node's key file is as sensitive as any private key: whoever copies it can take the node's id.
The hello proof signs the coordinator's nonce but not its address, so a coordinator a node talks
to could pass on another coordinator's nonce and register there in the node's name; links to that
id can still only be completed by the real node (only it signs its SDPs): denial, not interception.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine import paths
from engine.errors import ConfigError, IdentityError, ProtocolError

log = logging.getLogger(__name__)

#: Bytes of sha256(public key) in a key id: 128 bits, 26 base32 characters.
KEY_ID_BYTES = 16
_PUBLIC_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_TAG = re.compile(r"[a-z][a-z0-9]{0,15}")
_KEY_ID = re.compile(r"[a-z2-7]{26}")
_FINGERPRINT_PREFIX = "a=fingerprint:"
#: Domain separation: a signature made for one purpose is never valid for another.
_SDP_CONTEXT = "kluster-sdp-v1"
_HELLO_CONTEXT = "kluster-hello-v1"


def key_id(public_key: bytes) -> str:
    """The self-certifying part of a peer id: lowercase base32 of sha256(public key)[:16]."""
    digest = hashlib.sha256(public_key).digest()[:KEY_ID_BYTES]
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def peer_id_for(tag: str, public_key: bytes) -> str:
    """``<tag>-<key id>``: the tag says what the peer is (``n`` node, ``c`` client, ``p`` probe)."""
    if not _TAG.fullmatch(tag):
        raise ConfigError(f"peer id tag must be 1-16 lowercase letters or digits, got {tag!r}")
    return f"{tag}-{key_id(public_key)}"


def key_id_of(peer_id: str) -> str | None:
    """The key id a peer id names, or None if the id is not ``<tag>-<key id>``."""
    tag, sep, kid = peer_id.rpartition("-")
    if not sep or not _TAG.fullmatch(tag) or not _KEY_ID.fullmatch(kid):
        return None
    return kid


def encode_b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_b64(value: object, size: int, what: str) -> bytes:
    """Strict base64 of exactly ``size`` bytes, else IdentityError naming ``what``."""
    if not isinstance(value, str) or len(value) > 4 * size:
        raise IdentityError(f"no valid {what}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(f"no valid {what}") from None
    if len(raw) != size:
        raise IdentityError(f"no valid {what}")
    return raw


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An ed25519 private key and the ids derived from its public half."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        #: base64 of the raw 32-byte public key, as sent in hellos and signals
        self.public_b64 = encode_b64(self.public_key)
        #: the self-certifying key id (26 characters)
        self.id = key_id(self.public_key)

    @classmethod
    def ephemeral(cls) -> Identity:
        """A fresh key held only in memory (a client's, for one process)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """The key in ``path`` (PEM, PKCS#8), creating it (mode 0600, atomically) if absent.

        Creation writes a temporary file and hard-links it into place, so two processes starting
        at once end up with the same key and a crash never leaves a half-written one. A file that
        exists but cannot be read or parsed is a :class:`ConfigError`, never silently replaced:
        replacing it would change the node's peer id.
        """
        path = path.expanduser()
        if not path.exists():
            cls._create(path)
        try:
            data = path.read_bytes()
            key = serialization.load_pem_private_key(data, password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"cannot use identity key {path}: {_reason(exc)}; fix it, or delete it to create a new "
                "identity (the node's peer id changes)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"identity key {path} is not an ed25519 key")
        with contextlib.suppress(OSError):
            if os.name == "posix" and path.stat().st_mode & 0o077:
                log.warning("identity key %s is readable by other users; chmod 600 it", path)
        return cls(key)

    @staticmethod
    def _create(path: Path) -> None:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return  # another process created it first: use theirs
            log.info("created identity key %s", path)
        except OSError as exc:
            raise ConfigError(f"cannot create identity key {path}: {_reason(exc)}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def peer_id(self, tag: str) -> str:
        """This identity's peer id with role tag ``tag`` (what a coordinator assigns, or a test uses)."""
        return peer_id_for(tag, self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def sign_b64(self, message: bytes) -> str:
        return encode_b64(self.sign(message))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "not a PEM private key" if isinstance(exc, ValueError) else str(exc) or type(exc).__name__


def default_node_identity_path(name: str) -> Path:
    """Where ``kluster node --name NAME`` keeps its key unless ``--identity`` says otherwise.

    One key per node name, so several nodes on one machine (the demo, the tests) have distinct ids.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "node"
    if safe != name:  # two names must not share a file after sanitizing
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return paths.data_dir() / "identity" / f"node-{safe}.key"


# -- what gets signed -----------------------------------------------------------------------------


def sdp_fingerprints(sdp: str) -> tuple[str, ...]:
    """Every DTLS fingerprint line of ``sdp`` (session and media level), normalized and sorted.

    Lines are found exactly as aiortc's parser finds them (``str.splitlines``, a line starting with
    ``a=fingerprint:``), and normalized as aiortc compares them (algorithm lowercase, hex
    uppercase), so the set checked here is the set aiortc will hold the peer's certificate to.
    """
    found = set()
    for line in sdp.splitlines():
        if not line.startswith(_FINGERPRINT_PREFIX):
            continue
        parts = line[len(_FINGERPRINT_PREFIX) :].split()
        if len(parts) != 2:
            raise ProtocolError("SDP has a malformed fingerprint line")
        found.add(f"{parts[0].lower()} {parts[1].upper()}")
    return tuple(sorted(found))


def sdp_binding(kind: str, link_id: str, sender: str, receiver: str, fingerprints: tuple[str, ...]) -> bytes:
    """The canonical bytes signed for one offer or answer (JSON: unambiguous whatever the fields hold)."""
    fields = [_SDP_CONTEXT, kind, link_id, sender, receiver, list(fingerprints)]
    return json.dumps(fields, separators=(",", ":")).encode()


def sign_sdp(identity: Identity, kind: str, link_id: str, sender: str, receiver: str, sdp: str) -> dict[str, str]:
    """The ``key`` and ``sig`` fields an offer/answer from ``sender`` to ``receiver`` carries."""
    binding = sdp_binding(kind, link_id, sender, receiver, sdp_fingerprints(sdp))
    return {"key": identity.public_b64, "sig": identity.sign_b64(binding)}


def check_sdp(signal: dict[str, object], kind: str, link_id: str, sender: str, receiver: str, sdp: str) -> None:
    """Raise :class:`IdentityError` unless ``signal`` proves ``sender`` vouches for ``sdp``'s fingerprints.

    ``sender`` is the id the relay says the signal came from, ``receiver`` our own id. The key must
    derive ``sender`` (self-certifying id) and its signature must cover exactly the fingerprints
    present in the SDP as received.
    """
    try:
        public_key = decode_b64(signal.get("key"), _PUBLIC_KEY_BYTES, "identity key")
        signature = decode_b64(signal.get("sig"), _SIGNATURE_BYTES, "signature")
        claimed = key_id_of(sender)
        if claimed is None:
            raise IdentityError("its peer id does not name a key")
        if key_id(public_key) != claimed:
            raise IdentityError("its key does not match its peer id")
        try:
            fingerprints = sdp_fingerprints(sdp)
        except ProtocolError as exc:
            raise IdentityError(str(exc)) from None
        if not fingerprints:
            raise IdentityError("its SDP carries no DTLS fingerprint")
        if not verify(public_key, signature, sdp_binding(kind, link_id, sender, receiver, fingerprints)):
            raise IdentityError(
                "the signature does not cover this link's DTLS fingerprints (changed by the signaling relay?)"
            )
    except IdentityError as exc:
        raise IdentityError(f"peer {sender} failed identity check: {exc}") from None


def hello_proof(role: str, nonce: str) -> bytes:
    """What a peer signs in its hello: the coordinator's fresh nonce proves the key is held now."""
    return json.dumps([_HELLO_CONTEXT, role, nonce], separators=(",", ":")).encode()


def check_hello(key: object, sig: object, role: str, nonce: str) -> bytes:
    """The public key of a hello whose signature over :func:`hello_proof` verifies; else IdentityError."""
    public_key = decode_b64(key, _PUBLIC_KEY_BYTES, "identity key")
    signature = decode_b64(sig, _SIGNATURE_BYTES, "signature")
    if not verify(public_key, signature, hello_proof(role, nonce)):
        raise IdentityError("hello signature does not verify")
    return public_key
