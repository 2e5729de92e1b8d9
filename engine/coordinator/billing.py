"""The coordinator's billing: assignments for the routes it hands out, credit for countersigned receipts.

Flow (see README "Earnings and the ledger"). ``GET /v1/route?client=`` mints a job id for the route
and records an :class:`~engine.ledger.credit.Assignment` per hop; the hops sign receipts for the
job (``engine.node.receipts``) and send them here, the coordinator relays each to the job's client,
which countersigns what it asked for (``engine.client.receipts``) and sends it back; then
:meth:`Billing.submit` decides (``CreditBook.submit``, on the event loop: replays, supplier-only
and unassigned receipts earn nothing) and appends the supplier's credit and the developer's debit
in one ledger transaction in a worker thread (the fsync never blocks the loop). If the append
fails the decision is reverted, so the same receipt can be credited when it is sent again.

Accounts. A credit goes to the supplier's account: the account its node registered under when auth
is on, else its peer id. A debit goes to the assignment's developer: the requesting account with
auth on, else the tenant the route request named, else the client's peer id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.coordinator import events
from engine.coordinator.events import EventHub
from engine.errors import ConfigError
from engine.ledger.chain import Kind
from engine.ledger.credit import Assignment, CreditBook, Decision, Reject, forfeit_entries, ledger_entries
from engine.ledger.pricing import DEFAULT_KEY, Pricing
from engine.ledger.receipts import ReceiptError, SignedReceipt
from engine.ledger.store import Ledger, LedgerError, Statement

log = logging.getLogger(__name__)

#: micro-units per million tokens when no price is configured (0.20 per million tokens)
DEFAULT_PRICE_PER_MTOK = 200_000
#: billing jobs (routes) remembered: past this the oldest is forgotten, and a receipt for it comes
#: too late to earn (a route is one generation; 20,000 newer ones come long after its last receipt)
MAX_JOBS = 20_000
#: token positions a route's job may run when the route request does not say (the client's
#: countersignature is the real bound: it signs only what it asked for)
DEFAULT_JOB_TOKENS = 1 << 20


def load_pricing(path: Path | None, default: int) -> Pricing:
    """``--prices FILE`` (JSON ``{model: micro-units per million tokens}``, ``default`` optional) and
    ``--price-per-mtok`` (the default) as one :class:`Pricing`; a bad file is a one-line ConfigError."""
    if path is None:
        return Pricing(default=default)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read prices {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"prices {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"prices {path} must be a JSON object {{model: micro-units per million tokens}}")
    return Pricing.from_dict({DEFAULT_KEY: default, **data})


@dataclass(frozen=True)
class Hop:
    """One hop of a route as billing needs it."""

    supplier: str
    fragment_id: str
    layers: tuple[int, int]


def new_job_id(named: str = "") -> str:
    """A fresh job id for a route; prefixed with a jobs-API job id the request named (one per route:
    a failover's new route is a new billing job, so a supplier's counters never mix two routes)."""
    suffix = secrets.token_hex(6)
    return f"{named}.r{suffix}" if named else f"r-{suffix}"


class Billing:
    """Owns the ledger, the credit book and the prices. Call everything from the event loop."""

    def __init__(
        self,
        ledger: Ledger,
        pricing: Pricing,
        hub: EventHub | None = None,
        *,
        supplier_account: Callable[[str], str] = lambda peer: peer,
    ) -> None:
        self.ledger = ledger
        self.pricing = pricing
        self.book = CreditBook()
        self._hub = hub
        #: peer id -> the account a credit goes to (its node's account with auth on)
        self._supplier_account = supplier_account
        #: job -> its client's peer id (where the job's receipts are relayed), oldest first
        self._clients: dict[str, str] = {}
        self.max_jobs = MAX_JOBS
        #: suppliers (peer ids) a spot check caught: their receipts earn nothing from then on
        self.banned: set[str] = set()
        #: ledger writes one at a time: a forfeit must see every credit already decided
        self._write = asyncio.Lock()
        restored = self.book.restore(ledger.receipts())
        if restored:
            log.info("ledger %s: credit state rebuilt from %d receipts", ledger.path, restored)

    def assign(
        self,
        job_id: str,
        *,
        client: str,
        developer: str,
        model: str,
        model_layers: int,
        hops: Sequence[Hop],
        max_tokens: int = DEFAULT_JOB_TOKENS,
    ) -> None:
        """Record the work of a route: the only work receipts of ``job_id`` can earn for."""
        for hop in hops:
            self.book.assign(
                Assignment(
                    job_id=job_id,
                    supplier=hop.supplier,
                    client=client,
                    model=model,
                    model_layers=model_layers,
                    fragment_id=hop.fragment_id,
                    layers=hop.layers,
                    max_tokens=max_tokens,
                    developer=developer,
                )
            )
        self._clients[job_id] = client
        while len(self._clients) > self.max_jobs:  # bounded memory: the oldest job goes
            oldest = next(iter(self._clients))
            del self._clients[oldest]
            self.book.forget(oldest)

    def client_of(self, job_id: str, supplier: str) -> str | None:
        """The client to relay ``supplier``'s receipt for ``job_id`` to; None when it was never assigned."""
        assignment = self.book.assignment(job_id, supplier)
        return None if assignment is None else assignment.client

    async def submit_json(self, text: object) -> Decision | str:
        """``submit`` for a receipt off the wire: the decision, or why it could not be read."""
        if not isinstance(text, str):
            return "the receipt is not JSON text"
        try:
            signed = SignedReceipt.from_json(text)
        except ReceiptError as exc:
            return str(exc)
        return await self.submit(signed)

    async def submit(self, signed: SignedReceipt) -> Decision:
        """Decide on a countersigned receipt and, if it earns, write its credit and debit rows."""
        if signed.receipt.supplier in self.banned:
            r = signed.receipt
            last = self.book.last(r.job_id, r.supplier)
            why = "the supplier was banned by a spot check"
            return Decision(r.job_id, r.supplier, 0, Reject.BANNED, why, last, last)
        decision = self.book.submit(signed)
        if not decision.ok:
            return decision
        assignment = self.book.assignment(decision.job_id, decision.supplier)
        if assignment is None:  # forgotten between the two lines above: impossible on one loop
            self.book.revert(decision)
            return decision
        payee = self._supplier_account(assignment.supplier)
        entries = [
            replace(e, account=payee) if e.kind is Kind.CREDIT else e
            for e in ledger_entries(decision, signed, assignment, self.pricing)
        ]
        try:
            async with self._write:
                await asyncio.to_thread(self.ledger.append_many, entries)
        except LedgerError as exc:
            self.book.revert(decision)
            log.error("receipt of %s for job %s not recorded: %s", payee, decision.job_id, exc)
            raise
        amount = entries[0].amount if entries else 0
        if self._hub is not None:
            self._hub.publish(
                events.LEDGER_CREDIT,
                job_id=decision.job_id,
                supplier=payee,
                developer=assignment.account,
                model=assignment.model,
                units=decision.units,
                amount=amount,
            )
        return decision

    async def forfeit(self, job_id: str, supplier: str) -> int:
        """Ban ``supplier`` from earning and take back what it earned on ``job_id`` (refunding the
        developer); returns the amount taken back. Later receipts of the supplier earn nothing."""
        self.banned.add(supplier)
        async with self._write:
            rows = await asyncio.to_thread(self.ledger.job_rows, job_id)
            entries = forfeit_entries(rows, supplier)
            await asyncio.to_thread(self.ledger.append_many, entries)
        taken = sum(e.amount for e in entries if e.kind is Kind.CLAWBACK)
        if entries:
            log.warning("took back %d micro-units from %s for job %s", taken, supplier, job_id)
        return taken

    async def statement(self, account: str, kind: Kind) -> dict[str, Any]:
        """The ``/v1/earnings`` (credits) or ``/v1/spend`` (debits) body of ``account``."""
        st: Statement = await asyncio.to_thread(self.ledger.statement, account, kind)

        def totals(x: Any) -> dict[str, int]:
            return {"units": x.units, "amount": x.amount}

        return {
            "account": account,
            "today": totals(st.today),
            "last_7_days": totals(st.last_7_days),
            "total": totals(st.total),
            "per_job": {job: totals(x) for job, x in st.per_job.items()},
            "currency_micro": True,
        }

    def close(self) -> None:
        self.ledger.close()
