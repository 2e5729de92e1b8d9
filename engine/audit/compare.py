"""Comparing a route's records with the reference: the one step the coordinator's audits and
``kluster bench verify`` share, so what the bench calibrates is exactly what the coordinator decides.

Each boundary between hop b and hop b+1 has two records, the sender's sketch of what it sent and
the receiver's sketch of what it got, each under its own node's key; both are compared with the
reference projected the same way, position by position (``engine.audit.sketch``), and the first
deviations go to the judge (``engine.audit.judge``) with the first generated token the reference
would not have picked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.audit.judge import Blame, View, blame, view
from engine.audit.reference import Reference, Tolerance
from engine.audit.sketch import RECEIVED, SENT, projection, relative_errors, sketch


@dataclass(frozen=True)
class Assessment:
    blame: Blame
    #: every view's relative error at every position
    errors: list[float]
    #: the largest logit gap of a generated token behind the reference's choice
    max_gap: float


def assess(
    ref: Reference,
    sent: Sequence[torch.Tensor],
    received: Sequence[torch.Tensor],
    keys: Sequence[bytes],
    tokens: list[int],
    *,
    given: int,
    check_tokens: bool,
    tolerance: Tolerance,
    tokens_disagree_at: int | None = None,
) -> Assessment:
    """Judge one route against ``ref``.

    ``sent[b]`` / ``received[b]``: the sketch rows hop b sent / hop b+1 received (one per boundary);
    ``keys[b]``: hop b's projection key; ``tokens``: the history the route saw, the first ``given``
    of them fed by the client (the route answers for the rest, and for those only when ``check_tokens``:
    ``ref.gaps`` then measure each generated token the way it was picked, greedy or seeded).
    """
    errors: list[float] = []
    sent_views: list[View] = []
    received_views: list[View] = []
    for b in range(len(keys) - 1):
        hidden = ref.sent[b].shape[-1]
        want_sent = sketch(ref.sent[b], projection(keys[b], SENT, hidden))
        want_got = sketch(ref.received[b], projection(keys[b + 1], RECEIVED, hidden))
        err_sent = relative_errors(sent[b], want_sent, ref.sent[b]).tolist()
        err_got = relative_errors(received[b], want_got, ref.received[b]).tolist()
        errors += err_sent + err_got
        sent_views.append(view(err_sent, tolerance.hidden, tolerance.hidden_low))
        received_views.append(view(err_got, tolerance.hidden, tolerance.hidden_low))
    gaps = ref.gaps.tolist()
    generated = range(max(given, 1), len(tokens))
    token_dev = next((q for q in generated if gaps[q - 1] > tolerance.logit_gap), None) if check_tokens else None
    max_gap = max((gaps[q - 1] for q in generated), default=0.0)
    found = blame(len(keys), received_views, sent_views, token_dev, tokens_disagree_at)
    return Assessment(found, errors, max_gap)
