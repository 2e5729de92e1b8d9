"""The grid as the coordinator last described it, plus what the event stream changed since (pure state).

Polls (``GET /v1/nodes``, ``/v1/models``, ``/v1/jobs``) replace the snapshot; events patch jobs
in between and ask for an early poll when nodes change. The aggregate tokens/s counts this
client's own tokens as they stream, and other clients' jobs from the growth of their reported
token counts (runners report every 15 s, so their share is coarse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .rates import RateMeter


@dataclass
class FragmentView:
    index: int
    start: int
    end: int
    hosts: list[str]
    ready: int


@dataclass
class GridModel:
    nodes: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    #: None: never reached yet; False: the last attempt failed (``error`` says why)
    connected: bool | None = None
    error: str | None = None
    #: whether the event stream is attached now
    streaming: bool = False
    throughput: RateMeter = field(default_factory=RateMeter)
    revision: int = 0
    _tokens_seen: dict[str, int] = field(default_factory=dict)

    def changed(self) -> None:
        self.revision += 1

    def set_snapshot(
        self,
        nodes: list[dict[str, Any]],
        models: list[dict[str, Any]],
        jobs: list[dict[str, Any]],
        now: float,
        local_ids: set[str],
    ) -> None:
        self.nodes, self.models, self.jobs = nodes, models, jobs
        self.connected, self.error = True, None
        for job in jobs:
            job_id, tokens = str(job.get("id")), job.get("tokens")
            if not isinstance(tokens, int):
                continue
            before = self._tokens_seen.get(job_id)
            self._tokens_seen[job_id] = tokens
            if job_id not in local_ids and before is not None and tokens > before:
                self.throughput.add(tokens - before, now)
        self.changed()

    def set_error(self, message: str) -> None:
        self.connected, self.error = False, message
        self.changed()

    def apply_event(self, event: dict[str, Any]) -> bool:
        """Patch the jobs from a ``job.*`` event; True when a fresh poll is needed (nodes changed, events lost)."""
        kind = str(event.get("kind", ""))
        job = event.get("job")
        if kind.startswith("job.") and isinstance(job, dict):
            for i, old in enumerate(self.jobs):
                if old.get("id") == job.get("id"):
                    self.jobs[i] = {**old, **job}
                    break
            else:
                self.jobs.append(job)
            self.changed()
            return False
        return kind.startswith("node.") or kind == "stream.dropped"

    # ------------------------------------------------------------ summaries

    def queue_length(self) -> int:
        return sum(1 for j in self.jobs if j.get("state") == "queued")

    def running(self) -> int:
        return sum(1 for j in self.jobs if j.get("state") == "running")

    def ready_nodes(self) -> int:
        return sum(1 for n in self.nodes if n.get("ready"))

    def fragments(self, model: dict[str, Any]) -> list[FragmentView]:
        out = []
        for f in model.get("fragments") or []:
            if isinstance(f, dict):
                hosts = [str(h) for h in f.get("hosts") or []]
                out.append(FragmentView(_int(f, "index"), _int(f, "start"), _int(f, "end"), hosts, _int(f, "ready")))
        return out

    def rtts(self) -> dict[str, dict[str, float]]:
        return {str(n.get("peer_id")): dict(n.get("rtt_ms") or {}) for n in self.nodes}


def _int(item: dict[str, Any], key: str) -> int:
    """A count from the coordinator's JSON; 0 when missing or malformed (a view must not crash on it)."""
    value = item.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def span_of(value: Any) -> tuple[int, int] | None:
    """A ``[start, end)`` pair from the coordinator's JSON, or None."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(i, int) for i in value):
        return value[0], value[1]
    return None


def gpu_label(node: dict[str, Any]) -> str:
    """A node's accelerator in a few words: 'RTX 4090 24 GiB', '2x A100 80 GiB', or 'CPU (no GPU)'."""
    capability = node.get("capability")
    gpu = capability.get("gpu") if isinstance(capability, dict) else None
    if not isinstance(gpu, dict) or gpu.get("kind") != "nvidia":
        return "CPU (no GPU)"
    name = str(gpu.get("name") or "GPU").removeprefix("NVIDIA ").removeprefix("GeForce ")
    devices = gpu.get("devices")
    count = len(devices) if isinstance(devices, list) else 1
    vram = gpu.get("vram_total_bytes")
    label = f"{name} {vram / 2**30:.0f} GiB" if isinstance(vram, int | float) and vram else name
    return f"{count}x {label}" if count > 1 else label


def node_speed(node: dict[str, Any]) -> float | None:
    speed = node.get("measured_layers_per_s")
    return float(speed) if isinstance(speed, int | float) else None


def node_layers(node: dict[str, Any]) -> str:
    span = span_of(node.get("layers"))
    return "-" if span is None else f"{span[0]}-{span[1] - 1}"


def node_rtt(node: dict[str, Any]) -> float | None:
    """The node's median round trip to the peers it talks to (ms), when it reported any."""
    rtts = [v for v in (node.get("rtt_ms") or {}).values() if isinstance(v, int | float)]
    if not rtts:
        return None
    rtts.sort()
    return float(rtts[len(rtts) // 2])
