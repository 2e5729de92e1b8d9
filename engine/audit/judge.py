"""Who is to blame: the spot check's decision, a pure function of where each view first went wrong.

Views. Between hop b and hop b+1 two parties say what crossed: the sender (a sketch of what it
sent) and the receiver (a sketch of what it got). The last hop's output is a token, seen by the
client and, in the ring, by the first hop; both must agree (``tokens_disagree_at``). Each view is
compared with the coordinator's reference position by position; a ``View`` holds the first
position where it is off by more than the tolerance (``high``) and by more than honest noise
ever is (``low``, a smaller threshold); None means never.

Blame. A hop's output at position p depends on its inputs at positions <= p (its KV cache). So
hop b is a *culprit* when its output is clearly wrong (``high``) strictly before its input shows
any sign of deviating (``low``): its inputs were right up to there, its output was not. The two
thresholds keep an honest hop from being blamed for amplifying a small error it was fed. The
first hop's input is token ids: it goes wrong where a token does (the last hop's output of the
position before). A culprit whose own sent view admits a deviation beyond honest noise (``low``)
anywhere is *guilty*; one whose sent view stays within honest noise while its receiver's does not
is a *dispute*: either the sender lied about what it sent or the receiver
about what it got, and nothing here can say which, so both are avoided and neither is banned.
A deviation with no culprit (possible only near the thresholds) is a dispute of the boundary
where it first shows.

Rewind. Tokens from the first suspect position on may be wrong: a deviating hidden state at
position p poisons predictions from p+1, a wrong token at q is wrong itself. The client keeps what
comes before and regenerates the rest on a route without the culprits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class View:
    """Where one view first deviates: beyond the tolerance (``high``) and beyond honest noise (``low``)."""

    high: int | None = None
    low: int | None = None


@dataclass(frozen=True)
class Blame:
    """Route hop indexes found guilty, hop pairs in dispute, and the first position to regenerate."""

    guilty: tuple[int, ...] = ()
    disputes: tuple[tuple[int, int], ...] = ()
    #: the first position whose token may be wrong (None: nothing deviated)
    rewind_to: int | None = None
    #: something deviated beyond the tolerance
    failed: bool = False
    #: the disputes about what crossed a link between two hops (the others: client vs route tokens)
    links: tuple[tuple[int, int], ...] = ()


def _lt(a: int | None, b: int | None) -> bool:
    """``a < b`` with None as infinity."""
    return a is not None and (b is None or a < b)


def _min(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _after(p: int | None) -> int | None:
    return None if p is None else p + 1


def blame(
    hops: int,
    received: list[View],
    sent: list[View],
    token_dev: int | None,
    tokens_disagree_at: int | None = None,
) -> Blame:
    """Decide from first-deviation positions (see the module docstring).

    ``received[b]`` / ``sent[b]``: the boundary between hop b and hop b+1 as its receiver / sender
    shows it (``hops - 1`` entries each). ``token_dev``: the first position whose token is not what
    the reference would pick (None when tokens are not checked: top-p sampling, or unknown).
    ``tokens_disagree_at``: the first position where the client's tokens and the first hop's differ.
    """
    if hops < 1 or len(received) != hops - 1 or len(sent) != hops - 1:
        raise ValueError("one received and one sent view per boundary between hops")
    failed = (
        token_dev is not None
        or tokens_disagree_at is not None
        or any(v.high is not None for v in (*received, *sent))
    )
    if not failed:
        return Blame()
    links: set[tuple[int, int]] = set()
    # per hop: where its output is clearly wrong, and where its input first shows any deviation
    out_high: list[int | None] = [v.high for v in received] + [None if token_dev is None else token_dev - 1]
    in_low: list[int | None] = [token_dev] + [v.low for v in received]
    guilty: set[int] = set()
    for b in range(hops):
        if not _lt(out_high[b], in_low[b]):
            continue
        if b == hops - 1 or sent[b].low is not None:  # the last hop's output is tokens, seen by two
            guilty.add(b)
        else:
            links.add((b, b + 1))
    rewind = _min(token_dev, tokens_disagree_at, *[_after(v.low) for v in received if v.high is not None])
    near = [b for b in range(hops - 1) if received[b].high is not None or sent[b].high is not None]
    if not guilty and not links and near:
        # clearly off at a link, yet no hop's output went wrong before its input: near the thresholds
        links.add((near[0], near[0] + 1))
    disputes = set(links)
    if tokens_disagree_at is not None:
        # the last hop told the client one token and the first hop another, or one of them lies
        disputes.add((0, hops - 1))
    return Blame(tuple(sorted(guilty)), tuple(sorted(disputes)), rewind, True, tuple(sorted(links)))


def view(errors: list[float], high: float, low: float) -> View:
    """A view's first deviations from its per-position relative errors."""
    return View(first_over(errors, high), first_over(errors, low))


def first_over(errors: list[float], tolerance: float) -> int | None:
    """The first position whose relative error exceeds ``tolerance``, or None."""
    return next((p for p, e in enumerate(errors) if e > tolerance), None)
