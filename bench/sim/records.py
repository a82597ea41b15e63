"""What a simulation gives back: one ``SimRequest`` per request (DistServe's lifetime
events, simulated seconds) and per-instance counters, in a ``SimResult``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

TraceRow = tuple[float, int, int]  # (arrival_s, prompt_len, output_len)


@dataclass
class SimRequest:
    """One request's simulated life. ``token_times`` holds every output token's time
    (the first is ``first_token_s``, the last ``finish_s``); ``status`` is ``ok`` or
    ``rejected`` (the policy's admission said no; nothing else is then set).
    ``prefill_id`` None with a ``decode_id``: prefilled where it decoded (colocated, or
    local prefill). ``recomputed``: its KV lease ran out before the pull, so the decode
    instance computed the prompt again."""

    index: int
    arrival_s: float
    prompt_len: int
    output_len: int
    status: str = "ok"
    prefill_id: str | None = None
    decode_id: str | None = None
    prefill_start_s: float | None = None
    first_token_s: float | None = None
    transfer_start_s: float | None = None
    transfer_end_s: float | None = None
    finish_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    recomputed: bool = False

    @property
    def ttft_s(self) -> float | None:
        """Seconds from arrival to the first token (None if it never came)."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """``(last - first) / (n - 1)`` seconds per output token after the first; 0 for
        a single token, None if unfinished."""
        times = self.token_times
        if self.finish_s is None or not times:
            return None
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): every field plus ``ttft_s`` and ``tpot_s``."""
        return {**asdict(self), "ttft_s": self.ttft_s, "tpot_s": self.tpot_s}


@dataclass
class InstanceStats:
    """One simulated instance's counters over the run."""

    instance_id: str
    steps: int = 0
    busy_s: float = 0.0
    tokens: int = 0  # tokens computed (prefill chunks + decodes)
    preemptions: int = 0
    transfers: int = 0
    transfer_bytes: float = 0.0
    transfer_s: float = 0.0
    kv_stalls: int = 0  # times it had work but no free block to start any of it
    leases_expired: int = 0


@dataclass
class SimResult:
    """Every request (in input order), every instance's counters, when the last
    request finished (simulated seconds), the wall-clock seconds the simulation took
    and the number of events it ran (arrivals included)."""

    requests: list[SimRequest]
    instances: list[InstanceStats]
    sim_end_s: float
    wall_s: float
    num_events: int

    def to_dicts(self) -> list[dict[str, Any]]:
        """The requests as plain dicts (``SimRequest.to_dict``)."""
        return [r.to_dict() for r in self.requests]

    def summary(self) -> dict[str, Any]:
        """Totals: requests, finished, rejected, recomputed, preemptions, steps, events,
        simulated and wall-clock seconds."""
        reqs, insts = self.requests, self.instances
        return {
            "requests": len(reqs),
            "finished": sum(r.finish_s is not None for r in reqs),
            "rejected": sum(r.status == "rejected" for r in reqs),
            "recomputed": sum(r.recomputed for r in reqs),
            "preemptions": sum(i.preemptions for i in insts),
            "kv_stalls": sum(i.kv_stalls for i in insts),
            "steps": sum(i.steps for i in insts),
            "events": self.num_events,
            "sim_end_s": self.sim_end_s,
            "wall_s": self.wall_s,
        }
