"""The node's side of work receipts: count the work done per job and sign cumulative receipts for it.

Why per job and not per session. The coordinator credits per (job, supplier), by sequence number
and cumulative units (``engine.ledger.credit``); a client may run several sessions over one route
(one job), so the count, the sequence and the hashes must run across all of them. A receipt's
``tokens`` range is therefore this node's JOB-WIDE count of token positions it ran: receipt k
covers ``[end of receipt k-1, end of receipt k)``, and ``cumulative_units`` is that end times the
layers served. A receipt that gets lost costs nothing: the next one's cumulative covers it.

When. Every ``every`` tokens (default 32) and when a session of the job closes, so a short
generation is paid for too. Signing is one ed25519 signature (~50 us), done where the step ran.

Hashes. ``input_hash`` / ``output_hash`` are rolling sha256 over the bytes of every input and
output tensor of the job so far: a receipt commits to exactly the activations the node consumed
and produced, and a later dispute can recompute them from a recording.

Memory: at most ``max_jobs`` jobs are remembered (least recently used out); a job forgotten here
restarts at seq 1, which the coordinator refuses as a replay, so an evicted job earns no more.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.ledger.receipts import Receipt, ReceiptError, SignedReceipt, sign_receipt
from engine.transport.identity import Identity

log = logging.getLogger(__name__)

#: tokens of work between two receipts of one job
RECEIPT_EVERY = 32
MAX_JOBS = 4096


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, any device), as hashed into receipts."""
    flat = tensor.detach().reshape(-1).contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.view(torch.uint8).numpy().tobytes()


@dataclass
class _JobWork:
    """What this node did for one job so far."""

    model: str
    fragment_id: str
    layers: tuple[int, int]
    #: token positions run (job-wide), and where the last receipt ended
    tokens: int = 0
    receipted: int = 0
    seq: int = 0
    input_hash: Any = field(default_factory=hashlib.sha256)
    output_hash: Any = field(default_factory=hashlib.sha256)
    sessions: set[str] = field(default_factory=set)


class ReceiptKeeper:
    """Per-job work counters of one node, turned into signed receipts. One thread at a time."""

    def __init__(self, identity: Identity, supplier: str, *, every: int = RECEIPT_EVERY, max_jobs: int = MAX_JOBS):
        if every < 1:
            raise ValueError("receipts must be signed at least every token")
        self._identity = identity
        #: our peer id (``n-...``): what receipts name as the supplier
        self.supplier = supplier
        self.every = every
        self._max_jobs = max_jobs
        self._jobs: OrderedDict[str, _JobWork] = OrderedDict()
        #: session -> its job, to flush the job when the session closes
        self._session_jobs: dict[str, str] = {}

    def record(
        self,
        job: str,
        session: str,
        *,
        model: str,
        fragment_id: str,
        layers: tuple[int, int],
        tokens: int,
        input_bytes: bytes,
        output_bytes: bytes,
    ) -> SignedReceipt | None:
        """Count one step (``tokens`` positions through ``layers``); a signed receipt when one is due."""
        if not job or tokens < 1:
            return None
        work = self._jobs.get(job)
        if work is None:
            work = self._jobs[job] = _JobWork(model, fragment_id, layers)
            if len(self._jobs) > self._max_jobs:
                _, old = self._jobs.popitem(last=False)
                for s in old.sessions:
                    self._session_jobs.pop(s, None)
        elif (work.model, work.fragment_id, work.layers) != (model, fragment_id, layers):
            # a route is fixed per job; another layer range is not work the job's assignment covers
            log.warning("job %s asked for layers %s here after %s; not receipted", job, layers, work.layers)
            return None
        self._jobs.move_to_end(job)
        work.sessions.add(session)
        self._session_jobs[session] = job
        work.tokens += tokens
        work.input_hash.update(input_bytes)
        work.output_hash.update(output_bytes)
        if work.tokens - work.receipted >= self.every:
            return self._sign(job, work)
        return None

    def session_closed(self, session: str) -> SignedReceipt | None:
        """A session ended: sign for the job's work not yet receipted, if any."""
        job = self._session_jobs.pop(session, None)
        work = None if job is None else self._jobs.get(job)
        if job is None or work is None:
            return None
        work.sessions.discard(session)
        return self._sign(job, work) if work.tokens > work.receipted else None

    def _sign(self, job: str, work: _JobWork) -> SignedReceipt | None:
        start, end = work.layers
        receipt_tokens = (work.receipted, work.tokens)
        try:
            receipt = Receipt(
                job_id=job,
                supplier=self.supplier,
                fragment_id=work.fragment_id,
                layers=work.layers,
                tokens=receipt_tokens,
                input_hash=work.input_hash.copy().hexdigest(),
                output_hash=work.output_hash.copy().hexdigest(),
                seq=work.seq + 1,
                cumulative_units=work.tokens * (end - start),
                model=work.model,
            )
            signed = sign_receipt(self._identity, receipt)
        except ReceiptError as exc:  # e.g. a job id that is no printable text: nothing to claim
            log.warning("cannot sign a receipt for job %r: %s", job, exc)
            return None
        work.seq += 1
        work.receipted = work.tokens
        return signed
