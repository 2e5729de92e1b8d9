"""Sketches: a few secret random projections of each position's hidden state, what spot checks compare.

Why sketches: a hop's output at step t depends on every input it ever got for the session (its KV
cache), so a check that looks at step t alone would blame an honest hop whose cache an earlier
hop had poisoned. A spot check therefore compares *every* position a hop has processed, and a
hidden state per position (``hidden_size`` floats) is too much to keep and send; ``SKETCH_DIM``
Gaussian projections keep its relative error (Johnson-Lindenstrauss) in 32 bytes per position.

Why secret: if a sender knew the projection its receiver uses, it could perturb its output along
directions that projection does not see. Each node's projections come from a key only it and the
coordinator hold (``node_key``), one per direction (what it received, what it sent), so a sender
cannot aim at the receiver's blind spots.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import torch

from engine.errors import ProtocolError

#: projections per position: 8 floats hold the relative error of a 576- to 8192-wide state well
#: enough for tolerances of a few percent, and 2,048 positions x 2 directions stay under 180 KB
SKETCH_DIM = 8
#: positions a spot check covers at most (the whole session up to the checked step)
MAX_AUDIT_POSITIONS = 2048
#: the two directions a node sketches
RECEIVED, SENT = "received", "sent"


def node_key(secret: bytes, peer_id: str) -> bytes:
    """The key of a node's projections: derived from the coordinator's secret, so it survives restarts."""
    return hmac.new(secret, b"kluster-audit-v1:" + peer_id.encode(), hashlib.sha256).digest()


def projection(key: bytes, direction: str, hidden: int) -> torch.Tensor:
    """The ``(hidden, SKETCH_DIM)`` float32 projection of ``direction`` under ``key`` (deterministic)."""
    digest = hashlib.sha256(key + f":{direction}:{hidden}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(hidden, SKETCH_DIM, generator=gen, dtype=torch.float32)


def sketch(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``(positions, SKETCH_DIM)`` sketches of ``x`` (any leading shape, last dimension ``hidden``)."""
    return x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32) @ proj


def relative_errors(got: torch.Tensor, want: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per position, an estimate of ``|h - h_ref| / |h_ref|`` from the sketches ``got`` (of h) and
    ``want`` (of h_ref), with the reference states themselves for the norm.

    Dividing by the full state's norm, not the sketch's: hidden states with a few huge channels
    can land on a projection that shrinks them, which would inflate an error measured in sketch
    space. E|R v|^2 = SKETCH_DIM |v|^2 for Gaussian R, hence the square root.
    """
    scale = reference.reshape(-1, reference.shape[-1]).float().norm(dim=-1).clamp_min(1e-6) * SKETCH_DIM**0.5
    return (got - want).norm(dim=-1) / scale


def encode_rows(rows: torch.Tensor) -> str:
    """Sketch rows as base64 of little-endian float32 (JSON-safe; never pickle)."""
    return base64.b64encode(rows.to(torch.float32).contiguous().numpy().tobytes()).decode("ascii")


def decode_rows(text: object, positions: int) -> torch.Tensor:
    """``positions`` sketch rows from ``encode_rows`` text; anything else raises ``ProtocolError``."""
    if not isinstance(text, str) or len(text) > 4 * (positions * SKETCH_DIM * 4) // 3 + 8:
        raise ProtocolError("sketch rows are not base64 text of the expected size")
    try:
        raw = bytearray(base64.b64decode(text, validate=True))
    except ValueError:
        raise ProtocolError("sketch rows are not base64") from None
    need = positions * SKETCH_DIM * 4
    if len(raw) != need:
        raise ProtocolError(f"sketch rows hold {len(raw)} bytes, {positions} positions need {need}")
    if not raw:
        return torch.empty(0, SKETCH_DIM)
    rows = torch.frombuffer(raw, dtype=torch.float32).reshape(positions, SKETCH_DIM)
    if not bool(torch.isfinite(rows).all()):
        raise ProtocolError("sketch rows hold NaN or infinite values")
    return rows
