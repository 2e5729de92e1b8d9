"""End to end: signed work receipts from real nodes, countersigned by the client, credited in the ledger.

A generation through 3 node processes must credit each node exactly tokens x its layers (at the
configured price) and debit the developer the sum; a replayed receipt, a receipt only the supplier
signed and a receipt for work never assigned must add nothing (issue 6's done-when, end to end).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.client.remote import RemotePipeline
from engine.coordinator.billing import DEFAULT_PRICE_PER_MTOK
from engine.launcher import LocalCluster, kluster_command
from engine.ledger.chain import Kind
from engine.ledger.pricing import Pricing
from engine.ledger.receipts import Receipt, SignedReceipt, countersign, sign_receipt
from engine.ledger.store import Ledger
from engine.models.sampling import SamplingParams
from engine.transport.identity import Identity
from engine.transport.signaling import SignalingClient

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
MODEL_LAYERS = 30
NEW_TOKENS = 40
PROMPT = list(range(100, 112))


async def _get(remote: RemotePipeline, path: str, account: str) -> dict[str, Any]:
    return await remote.signaling.http_json(path, {"account": account})


async def _settled(remote: RemotePipeline, accounts: list[str], units: int, timeout_s: float = 30.0) -> list[dict]:
    """The nodes' earnings once each reached ``units`` (the last receipts follow the session's close)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        earned = [await _get(remote, "/v1/earnings", a) for a in accounts]
        if all(e["total"]["units"] >= units for e in earned) or asyncio.get_running_loop().time() > deadline:
            return earned
        await asyncio.sleep(0.2)


async def _generate(remote: RemotePipeline) -> None:
    """NEW_TOKENS greedy tokens after PROMPT (no stop token: the ring runs to the end), then close."""
    pos, feed, max_tokens = 0, PROMPT, len(PROMPT) + NEW_TOKENS
    for _ in range(NEW_TOKENS):
        result = await remote.step("s", pos, feed, max_tokens, SamplingParams(temperature=0.0))
        pos, feed = pos + len(feed), [result.token_id]
    await remote.close_session("s")


class _Submitter:
    """A bare client socket that sends countersigned receipts and reads the coordinator's verdicts."""

    def __init__(self, url: str) -> None:
        self.verdicts: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.identity = Identity.ephemeral()
        self.signaling = SignalingClient(url, "client", "replayer", on_control=self._on_control, identity=self.identity)
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def _on_control(self, data: dict[str, Any]) -> None:
        if data.get("type") == "credit":
            await self.verdicts.put(data)

    async def __aenter__(self) -> _Submitter:
        await self.signaling.connect()
        self._task = asyncio.create_task(self.signaling.serve(lambda: self._stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        await self.signaling.shutdown()
        if self._task is not None:
            self._task.cancel()

    async def submit(self, signed: SignedReceipt) -> dict[str, Any]:
        await self.signaling.send({"type": "countersigned", "receipt": signed.to_json()})
        return await asyncio.wait_for(self.verdicts.get(), 10)


def test_receipts_credit_exactly_the_work_and_nothing_else(cluster3: LocalCluster) -> None:
    ledger_path = cluster3.log_dir / "ledger.sqlite3"
    pricing = Pricing(default=DEFAULT_PRICE_PER_MTOK)

    async def run() -> None:
        remote = RemotePipeline(cluster3.url, MODEL)
        try:
            await remote.start()
            assert remote.job, "the coordinator assigned the route no job"
            await _generate(remote)
            nodes = [h.peer_id for h in remote.route]
            layers = {h.peer_id: h.end - h.start for h in remote.route}
            positions = len(PROMPT) + NEW_TOKENS - 1  # the last sampled token is never fed back
            earned = await _settled(remote, nodes, positions * 10)
            for node, e in zip(nodes, earned, strict=True):
                units = positions * layers[node]
                assert e["total"]["units"] == units, (node, e)
                assert e["total"]["amount"] == pricing.amount(MODEL, MODEL_LAYERS, units)
                assert e["today"] == e["total"] == e["last_7_days"] and e["currency_micro"] is True
                assert e["per_job"] == {remote.job: e["total"]}
            spend = await _get(remote, "/v1/spend", remote.signaling.peer_id)
            assert spend["total"]["units"] == sum(e["total"]["units"] for e in earned)
            assert spend["total"]["amount"] == sum(e["total"]["amount"] for e in earned) > 0

            ledger = Ledger(ledger_path)
            try:
                rows = ledger.count()
                credited = [SignedReceipt.from_json(t) for t in ledger.receipts(Kind.CREDIT)]
            finally:
                ledger.close()
            async with _Submitter(cluster3.url) as sub:
                replay = await sub.submit(credited[-1])
                assert (replay["ok"], replay["reject"]) == (False, "replay")
                bare = SignedReceipt(credited[0].receipt, credited[0].supplier_key, credited[0].supplier_sig)
                assert (await sub.submit(bare))["reject"] == "not_countersigned"
                # work nobody assigned: a job never handed out, and the real job by another supplier
                stranger = Identity.ephemeral()
                for job in ("r-never-assigned", remote.job):
                    r = credited[0].receipt
                    fake = Receipt(
                        job, stranger.peer_id("n"), r.fragment_id, r.layers, r.tokens, r.input_hash,
                        r.output_hash, 99, r.cumulative_units + 1000, r.model,
                    )  # fmt: skip
                    verdict = await sub.submit(countersign(sub.identity, sign_receipt(stranger, fake)))
                    assert verdict["reject"] == "no_assignment", verdict
            after = [await _get(remote, "/v1/earnings", n) for n in nodes]
            assert after == earned
            ledger = Ledger(ledger_path)
            try:
                assert ledger.count() == rows
            finally:
                ledger.close()
        finally:
            await remote.shutdown()

    asyncio.run(run())
    result = subprocess.run(
        kluster_command("ledger", "verify", "--db", str(Path(ledger_path))), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "ledger ok" in result.stdout, result.stdout + result.stderr
