"""``plan_placements(...)``: the planner's entry point (``pdserve plan`` calls it too).

It reads the checkpoint's ``config.json``, loads the dataset (``bench.traces``) and
scales its lengths to the model's context (``bench.workload``: one factor for the
whole dataset, as every benchmark here does), resolves the device and its step
times (roofline on GPUs, measured or given on ``cpu``) and runs the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.metrics import SLO
from bench.planner.cpu_profile import load_latency_model, measured_latency_model
from bench.planner.devices import CPU, Device, get_device, load_calibration
from bench.planner.placements import AFFINITIES, Placement
from bench.planner.search import Planner, PlanResult
from bench.planner.sizing import PlanSpec
from bench.traces import SyntheticLengths, load_dataset
from bench.workload import fit_lengths, length_scale, make_workload
from engine.layout import plan_dtype
from engine.model_config import ModelConfig
from router.latency_model import LatencyModel

AFFINITY_CHOICES = ("both", *AFFINITIES)


@dataclass(frozen=True)
class PlanOptions:
    """How to plan (defaults as ``pdserve plan``'s flags).

    ``device``: ``h100``, ``h200``, ``a100`` or ``cpu``; ``dataset``: ``azure-conv``,
    ``azure-code``, ``synthetic`` or a ``.jsonl`` file; ``num_requests``: requests per
    simulation; ``affinity``: ``high`` (Algorithm 1), ``low`` (Algorithm 2) or
    ``both``; ``latency_model``: a measured model (or its JSON file) for one worker,
    which limits the layouts to ``tp = pp = 1`` (on ``cpu`` without one, the engine is
    profiled; ``threads`` per CPU worker); ``calibration``: a JSON file of
    ``Calibration`` fields; ``internode_gbps``: the network between nodes per GPU in
    Gb/s (default: the device's, 400 Gb/s InfiniBand); ``policy``: the router's."""

    device: str = "h100"
    dataset: str = "azure-conv"
    num_requests: int = 400
    affinity: str = "both"
    dtype: str = "auto"
    reserve: float = 0.2
    block_size: int = 16
    target: float = 0.9
    policy: str = "slo_aware"
    latency_model: LatencyModel | str | Path | None = None
    calibration: str | Path | None = None
    internode_gbps: float | None = None
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.affinity not in AFFINITY_CHOICES:
            raise ValueError(f"affinity must be one of {AFFINITY_CHOICES}, got {self.affinity!r}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.internode_gbps is not None and not self.internode_gbps > 0:
            raise ValueError(f"internode_gbps must be > 0, got {self.internode_gbps}")

    @property
    def affinities(self) -> tuple[str, ...]:
        """The algorithms to run."""
        return AFFINITIES if self.affinity == "both" else (self.affinity,)


def _device(options: PlanOptions, workers: int) -> Device:
    device = get_device(options.device, workers)
    if options.calibration is not None:
        device = load_calibration(device, options.calibration)
    if options.internode_gbps is not None:
        device = device.with_internode(options.internode_gbps * 1e9 / 8)
    return device


def _measured(model: Path, options: PlanOptions) -> LatencyModel | None:
    given = options.latency_model
    if isinstance(given, LatencyModel):
        return given
    if given is not None:
        return load_latency_model(given)
    if options.device == CPU:
        return measured_latency_model(model, options.threads, options.dtype)
    return None


def _lengths(cfg: ModelConfig, options: PlanOptions) -> tuple[list[tuple[int, int]], int]:
    """The seeded requests to simulate, and the dataset's longest request (tokens),
    both scaled to the model's context."""
    max_len = cfg.max_position_embeddings
    trace = load_dataset(options.dataset, options.num_requests, options.seed, SyntheticLengths())
    scale = length_scale(trace.prompt_lens, trace.output_lens, max_len)
    fitted = fit_lengths(trace.prompt_lens, trace.output_lens, max_len, scale=scale)
    longest = max(p + o for p, o in zip(fitted.prompt_lens, fitted.output_lens, strict=True))
    work = make_workload(trace, options.num_requests, 1.0, max_len, seed=options.seed)
    return [(r.prompt_len, r.output_len) for r in work.requests], longest


def build_spec(
    model: str | Path, workers: int, ttft_ms: float, tpot_ms: float, options: PlanOptions
) -> PlanSpec:
    """The ``PlanSpec`` of a request (see ``plan_placements``)."""
    path = Path(model)
    cfg = ModelConfig.from_pretrained(path)
    lengths, longest = _lengths(cfg, options)
    return PlanSpec(
        cfg=cfg,
        device=_device(options, workers),
        workers=workers,
        slo=SLO(ttft_ms / 1e3, tpot_ms / 1e3),
        lengths=tuple(lengths),
        longest=longest,
        dtype=plan_dtype(cfg, options.dtype),
        reserve=options.reserve,
        block_size=options.block_size,
        target=options.target,
        policy=options.policy,
        measured=_measured(path, options),
        seed=options.seed,
    )


def run_plan(
    model: str | Path,
    workers: int,
    ttft_ms: float,
    tpot_ms: float,
    options: PlanOptions | None = None,
    progress: bool = False,
) -> PlanResult:
    """The search with its bookkeeping (``PlanResult``)."""
    options = options or PlanOptions()
    spec = build_spec(model, workers, ttft_ms, tpot_ms, options)
    return Planner(spec, progress).run(options.affinities)


def plan_placements(
    model: str | Path,
    workers: int,
    ttft_ms: float,
    tpot_ms: float,
    options: PlanOptions | None = None,
) -> list[Placement]:
    """Placements of ``model`` (a directory with ``config.json``; weights only for a
    CPU profile) on ``workers`` devices for these SLOs (milliseconds), best first
    (highest simulated goodput; near-ties, within the search's 2%, by goodput per
    worker). E.g. P:D for 4 CPU workers:
    ``plan_placements("models/bench-llama-small", 4, 2000, 200, PlanOptions(device="cpu"))``
    then ``placements[0].candidate.num_prefill``."""
    return run_plan(model, workers, ttft_ms, tpot_ms, options).placements
