"""Fixed grid data for the TUI's snapshot tests (and only those).

Live data varies from run to run (measured speeds, round trips, token timings), so pictures of
the views are taken against this fake coordinator API and a frozen clock; behaviour is tested
against a real coordinator and real nodes in ``test_tui_live.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dev_tui.api import STREAM_CONNECTED
from dev_tui.config import TuiConfig
from dev_tui.localjobs import LaunchSpec, LocalJob
from engine.errors import CoordinatorError

#: the frozen "now" of every snapshot (2026-11-28 12:00:00 UTC)
NOW = 1_795_867_200.0
URL = "http://127.0.0.1:8765"


def _gpu(name: str | None, vram_gib: int | None) -> dict[str, Any]:
    if name is None:
        return {"kind": "cpu", "name": "Intel Xeon", "devices": []}
    vram = None if vram_gib is None else vram_gib * 2**30
    return {"kind": "nvidia", "name": name, "vram_total_bytes": vram, "devices": [{"name": name}]}


def _node(
    name: str, peer: str, frags: list[int], layers: list[int], speed: float, gpu: dict[str, Any], rtt: dict[str, float]
) -> dict[str, Any]:
    return {
        "peer_id": peer,
        "name": name,
        "model_id": "smollm2-135m",
        "ready": 1,
        "online": 1,
        "capability": {"gpu": gpu},
        "fragments": frags,
        "layers": layers,
        "measured_layers_per_s": speed,
        "memory_offered_bytes": 8 * 2**30 if gpu["kind"] == "nvidia" else 287_309_824,
        "sessions": 1,
        "rtt_ms": rtt,
    }


NODES = [
    _node("gpu-berlin", "n-aaa", [0, 1], [0, 10], 2410.0, _gpu("NVIDIA GeForce RTX 4090", 24), {"n-bbb": 21.8}),
    _node("gpu-lyon", "n-bbb", [1, 2], [10, 20], 1830.5, _gpu("NVIDIA GeForce RTX 3090", 24), {"n-ccc": 9.4}),
    _node("gpu-oslo", "n-ccc", [2, 3], [20, 30], 3120.2, _gpu("NVIDIA A100-SXM4-80GB", 80), {"n-aaa": 30.2}),
    _node("spare-cpu", "n-ddd", [1, 2], [10, 20], 74.5, _gpu(None, None), {}),
]
MODELS = [
    {
        "model_id": "smollm2-135m",
        "num_layers": 30,
        "fragments": [
            {"index": 0, "name": "frag-00-of-03", "start": 0, "end": 10, "hosts": ["gpu-berlin"], "ready": 1},
            {
                "index": 1,
                "name": "frag-01-of-03",
                "start": 10,
                "end": 20,
                "hosts": ["gpu-lyon", "spare-cpu"],
                "ready": 2,
            },
            {"index": 2, "name": "frag-02-of-03", "start": 20, "end": 30, "hosts": ["gpu-oslo"], "ready": 1},
        ],
    }
]
JOBS = [
    {
        "id": "job-3f2a9c81d0e4",
        "tenant": "acme",
        "model": "smollm2-135m",
        "priority": 7,
        "state": "running",
        "position": None,
        "created_at": NOW - 95,
        "tokens": 412,
        "params": {"max_new_tokens": 512},
    },
    {
        "id": "job-77b1e0c2a9f3",
        "tenant": "acme",
        "model": "smollm2-135m",
        "priority": 5,
        "state": "queued",
        "position": 1,
        "created_at": NOW - 20,
        "tokens": 0,
    },
    {
        "id": "job-0c9d8e7f6a5b",
        "tenant": "lab",
        "model": "smollm2-135m",
        "priority": 5,
        "state": "done",
        "position": None,
        "created_at": NOW - 1800,
        "tokens": 64,
    },
]


STORY = (
    "Rome began as a cluster of villages on the Palatine hill. Its legendary founding in 753 BC by "
    "Romulus gave way to a monarchy, then to the Republic in 509 BC, whose consuls and senate ruled "
    "as Rome spread across Italy and, after the Punic Wars, the Mediterranean."
)


class FakeApi:
    """The coordinator calls of ``GridApi`` with fixed answers; ``down`` makes every call fail."""

    def __init__(self, *, down: bool = False) -> None:
        self.base = URL
        self.down = down
        self.cancelled: list[str] = []

    def _check(self) -> None:
        if self.down:
            raise CoordinatorError(f"cannot reach the coordinator at {URL}: connection refused")

    async def nodes(self) -> list[dict[str, Any]]:
        self._check()
        return [dict(n) for n in NODES]

    async def models(self) -> list[dict[str, Any]]:
        self._check()
        return [dict(m) for m in MODELS]

    async def jobs(self) -> list[dict[str, Any]]:
        self._check()
        return [dict(j) for j in JOBS]

    async def cancel(self, job_id: str, job_token: str | None) -> dict[str, Any]:
        self._check()
        self.cancelled.append(job_id)
        return {"id": job_id, "state": "cancelled"}

    async def events(self, last_id: str | None) -> AsyncIterator[dict[str, Any]]:
        self._check()
        yield {"kind": STREAM_CONNECTED}
        await asyncio.Event().wait()  # a quiet stream

    async def close(self) -> None:
        return None


def config() -> TuiConfig:
    return TuiConfig(coordinator=URL, tenant="acme", price_per_mtok=0.8, token_source="env", token="t")


def failover_job() -> LocalJob:
    """A job of ours that failed over once, mid-stream, with fixed timings."""
    spec = LaunchSpec("smollm2-135m", ("Tell me about the history of Rome.",), max_new_tokens=128, priority=5)
    job = LocalJob("tui-1", spec, spec.prompts[0], NOW - 14.0, job_id="job-5e6f7a8b9c0d")
    job.set_state("running", NOW - 13.5)
    job.log(NOW - 13.6, "submitted as job-5e6f7a8b9c0d")
    job.set_route(
        [
            {"name": "gpu-berlin", "peer_id": "n-aaa", "layers": [0, 10]},
            {"name": "gpu-lyon", "peer_id": "n-bbb", "layers": [10, 20]},
            {"name": "gpu-oslo", "peer_id": "n-ccc", "layers": [20, 30]},
        ]
    )
    text = STORY.split()
    for i, word in enumerate(text[:20]):  # 4 tokens/s, then the stall, then faster
        job.add_token(word + " ", NOW - 13.0 + i * 0.25)
    job.node_gone("n-bbb", "gpu-lyon", NOW - 7.9)
    new = [
        {"name": "gpu-berlin", "peer_id": "n-aaa", "layers": [0, 10]},
        {"name": "spare-cpu", "peer_id": "n-ddd", "layers": [10, 20]},
        {"name": "gpu-oslo", "peer_id": "n-ccc", "layers": [20, 30]},
    ]
    job.rerouting(new, NOW - 7.5)
    event = {"failed_node": "gpu-lyon", "at_token": 20, "detected_after_ms": 212.0, "recovery_ms": 388.0}
    job.failover({**event, "event": "failover", "new_route": new}, NOW - 5.9)
    for i, word in enumerate(text[20:]):
        job.add_token(word + " ", NOW - 5.9 + i * 0.2)
    for _ in range(5):
        job.add_timings([("n-aaa", 0.2, 4.1), ("n-ddd", 1.5, 61.0), ("n-ccc", 0.1, 3.2)])
    job.set_links({"n-aaa": {"n-ddd": 24.0}, "n-ddd": {"n-ccc": 12.6}, "n-ccc": {"n-aaa": 30.2}})
    return job
