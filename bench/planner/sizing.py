"""What the planner plans for (``PlanSpec``) and one layout sized for it (``SizedLayout``).

Sizing a layout answers, without simulating: do the weights, the KV of the longest
request and the reserve fit (``engine.layout.plan_memory``)? How many KV blocks does
each pipeline micro-batch get? What are its step times (roofline or measured), and the
scheduler limits its instances run with?

Limits: on GPUs a prefill instance packs prompts up to the token budget that saturates
compute (DistServe: "the length that saturates compute"), chosen among powers of two
as the smallest within 5% of the best per-token step time, keeping one full step
under half the TTFT SLO; a decode instance batches up to ``GPU_MAX_NUM_SEQS``
sequences (vLLM's default) as KV allows. On ``cpu`` both are the engine's defaults
(``engine.config.SchedulerConfig``), the limits a CPU deployment actually runs with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.metrics import SLO
from bench.planner.devices import Device
from bench.planner.roofline import Layout, Roofline, latency_model
from bench.sim.config import PoolSpec
from engine.config import SchedulerConfig
from engine.layout import plan_memory
from engine.model_config import ModelConfig
from router.latency_model import LatencyModel

GPU_MAX_NUM_SEQS = 256
BUDGETS = (256, 512, 1024, 2048, 4096, 8192)
SATURATION = 1.05  # a budget "saturates" within 5% of the best per-token time


@dataclass(frozen=True)
class PlanSpec:
    """Everything a search needs: the model and device, ``workers`` to place, the SLOs
    and attainment ``target``, the requests to simulate (``lengths``: seeded
    ``(prompt, output)`` pairs of the dataset) and ``longest`` (the dataset's longest
    request, prompt + output, which every instance must hold). ``measured``: a measured
    latency model for one worker (``tp = pp = 1``), which then is the only layout.
    ``policy``: the router's (``router.policies``) in the simulations."""

    cfg: ModelConfig
    device: Device
    workers: int
    slo: SLO
    lengths: tuple[tuple[int, int], ...]
    longest: int
    dtype: str
    reserve: float = 0.2
    block_size: int = 16
    target: float = 0.9
    policy: str = "slo_aware"
    measured: LatencyModel | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.lengths:
            raise ValueError("need at least one request to simulate")
        if self.longest < max(p + o for p, o in self.lengths):
            raise ValueError(f"longest={self.longest} is shorter than a simulated request")
        if not 0 < self.target <= 1:
            raise ValueError(f"target attainment must be in (0, 1], got {self.target}")
        if self.measured is None and not self.device.roofline:
            raise ValueError(f"device {self.device.name!r} needs a measured latency model")


@dataclass(frozen=True)
class SizedLayout:
    """One layout sized for a ``PlanSpec``: ``kv_blocks`` per pipeline stage (every
    in-flight micro-batch shares them), step times and scheduler limits."""

    layout: Layout
    latency: LatencyModel
    kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int

    def pool(self, count: int) -> PoolSpec:
        """``count`` instances as the simulator runs them: ``pp`` independent
        instances each, with 1/pp of the blocks (``bench/planner/roofline.py``)."""
        pp = self.layout.pp
        return PoolSpec(
            count * pp,
            self.latency,
            self.kv_blocks // pp,
            self.block_size,
            self.max_num_seqs,
            self.max_num_batched_tokens,
        )


def saturating_budget(prefill_seconds: Callable[[Sequence[int]], float], ttft_s: float) -> int:
    """The prefill token budget: the smallest of ``BUDGETS`` whose per-token step time
    is within ``SATURATION`` of the best, among those whose step stays under half the
    TTFT SLO (the smallest budget when none does)."""
    allowed = [b for b in BUDGETS if prefill_seconds([b]) <= ttft_s / 2] or [BUDGETS[0]]
    per_token = {b: prefill_seconds([b]) / b for b in allowed}
    best = min(per_token.values())
    return min(b for b, t in per_token.items() if t <= best * SATURATION)


def size_layout(spec: PlanSpec, layout: Layout, across_nodes: bool = False) -> SizedLayout | str:
    """``layout`` sized for ``spec`` (its pipeline stages on different nodes when
    ``across_nodes``), or why it cannot run the workload (the memory plan's reason, or
    too few blocks per micro-batch for the longest request)."""
    plan = plan_memory(
        spec.cfg,
        spec.device.memory_bytes,
        spec.reserve,
        tp=layout.tp,
        pp=layout.pp,
        dtype=spec.dtype,
        block_size=spec.block_size,
        context_len=spec.longest,
    )
    if not plan.fits:
        return plan.reason
    per_microbatch = plan.kv_blocks // layout.pp
    if per_microbatch < plan.blocks_per_seq:
        return (
            f"{plan.kv_blocks} KV blocks over {layout.pp} micro-batches leave "
            f"{per_microbatch} each; the longest request needs {plan.blocks_per_seq}"
        )
    if spec.measured is not None:
        defaults = SchedulerConfig()
        return SizedLayout(
            layout,
            spec.measured,
            plan.kv_blocks,
            spec.block_size,
            defaults.max_num_seqs,
            defaults.max_num_batched_tokens,
        )
    roof = Roofline(spec.cfg, layout, spec.device, spec.dtype, across_nodes)
    budget = saturating_budget(roof.prefill_seconds, spec.slo.ttft_s)
    model = latency_model(
        roof,
        max_num_batched_tokens=budget,
        max_num_seqs=GPU_MAX_NUM_SEQS,
        max_model_len=spec.longest,
        kv_capacity_tokens=per_microbatch * spec.block_size,
    )
    return SizedLayout(layout, model, plan.kv_blocks, spec.block_size, GPU_MAX_NUM_SEQS, budget)
