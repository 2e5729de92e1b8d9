"""Paying suppliers for work they provably did: signed work receipts and a tamper-evident ledger.

receipts   Receipt (one fragment's work on a run of tokens of one job), its canonical bytes, the
           supplier's signature and the client's countersignature, strict JSON for the wire
credit     Assignment (what the coordinator asked a supplier to do) and ``decide``, the pure
           crediting decision (replays, missing countersignatures, forged signatures and
           unassigned work earn nothing); CreditBook, the per-(job, supplier) state around it
pricing    Pricing: a price per million tokens per model; turns units into integer micro-amounts
chain      pure: the canonical encoding and hash of a ledger row, and the walk that recomputes the
           chain and names the first edited, deleted or reordered row
store      Ledger: the append-only, hash-chained SQLite table (one transaction per append, safe
           from a worker thread) and the earnings / spend statements read from it

Nothing here imports the coordinator, node or client: they call in (``CreditBook.submit`` on the
event loop, ``Ledger.append`` in a thread), never the other way round.
"""
