"""The client's side of work receipts: countersign only work this client asked its route for.

A countersignature is the client's "I accept to pay for this", so it is given only to a receipt
that (1) is for a job this client holds (the coordinator named it in a route answer), (2) comes
from a hop of that job's route and names exactly that hop's layers, fragment-agnostic, and the
job's model, (3) claims no more token positions than this client requested over the job, and
(4) carries a valid supplier signature (``countersign`` refuses otherwise).

"Requested" is counted job-wide like the node's receipts (``engine.node.receipts``): each Forward
the client sends asks every hop for its positions plus the ring steps it lets the route run on
its own (an upper bound: a stop token may end the ring sooner, and the node then claims less).

What this does not check: the activation hashes. A single hop's receipt cannot be checked against
what the client saw (only the first hop's input and the last hop's output pass through it); see
``engine.ledger.receipts.check_route`` for the whole-route check.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from engine.ledger.receipts import ReceiptError, SignedReceipt, countersign
from engine.transport.identity import Identity

log = logging.getLogger(__name__)

#: jobs remembered (a pipeline gets a new job per route, i.e. per failover)
MAX_JOBS = 256


@dataclass
class _Job:
    model: str
    #: supplier peer id -> the (start, end) layers it serves in this job
    hops: dict[str, tuple[int, int]]
    #: token positions this client asked the route to run, job-wide
    requested: int = 0


class Countersigner:
    """The jobs this client holds and what it asked of them; countersigns receipts that match."""

    def __init__(self, identity: Identity, *, tag: str = "c", max_jobs: int = MAX_JOBS) -> None:
        self._identity = identity
        self._tag = tag
        self._max_jobs = max_jobs
        self._jobs: OrderedDict[str, _Job] = OrderedDict()

    def job_started(self, job: str, model: str, hops: dict[str, tuple[int, int]]) -> None:
        """The coordinator assigned ``job``: a route of ``hops`` for ``model``."""
        self._jobs[job] = _Job(model, dict(hops))
        self._jobs.move_to_end(job)
        while len(self._jobs) > self._max_jobs:
            self._jobs.popitem(last=False)

    def requested(self, job: str, positions: int) -> None:
        """We asked ``job``'s route to run ``positions`` more token positions."""
        held = self._jobs.get(job)
        if held is not None and positions > 0:
            held.requested += positions

    def requested_of(self, job: str) -> int:
        held = self._jobs.get(job)
        return 0 if held is None else held.requested

    def consider(self, text: object) -> SignedReceipt | None:
        """The countersigned receipt if ``text`` (a signed receipt's JSON) is work we asked for; else None."""
        if not isinstance(text, str):
            log.info("receipt from the coordinator is not JSON text; ignored")
            return None
        try:
            signed = SignedReceipt.from_json(text)
        except ReceiptError as exc:
            log.info("malformed receipt ignored: %s", exc)
            return None
        why = self._refusal(signed)
        if why:
            log.info("receipt %d of %s not countersigned: %s", signed.receipt.seq, signed.receipt.supplier, why)
            return None
        try:
            return countersign(self._identity, signed, tag=self._tag)
        except ReceiptError as exc:
            log.info("receipt %d of %s not countersigned: %s", signed.receipt.seq, signed.receipt.supplier, exc)
            return None

    def _refusal(self, signed: SignedReceipt) -> str:
        r = signed.receipt
        job = self._jobs.get(r.job_id)
        if job is None:
            return f"job {r.job_id} is not ours"
        if r.model != job.model:
            return f"it is for model {r.model}, the job runs {job.model}"
        layers = job.hops.get(r.supplier)
        if layers is None:
            return f"{r.supplier} is not on the job's route"
        if r.layers != layers:
            return f"it claims layers {list(r.layers)}, the route gave {r.supplier} {list(layers)}"
        if r.tokens[1] > job.requested:
            return f"it claims {r.tokens[1]} token positions, we requested {job.requested}"
        if r.cumulative_units > job.requested * (layers[1] - layers[0]):
            return f"it claims {r.cumulative_units} units, more than we requested"
        return ""
