"""`pdserve plan ...`: size and place deployments from a checkpoint's config (no device).

``pdserve plan --model DIR --workers N --slo-ttft MS --slo-tpot MS`` searches
placements (layouts and P:D counts, DistServe's Algorithms 1 and 2) by simulation
(``bench.planner``); ``plan memory`` and any later mode are nested subcommands
registered in ``add_plan``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from engine.layout import MemoryPlan, format_bytes, parse_bytes, plan_memory
from engine.model_config import ModelConfig
from router.cli_engine import pp_boundaries

Subparsers = Any  # argparse's _SubParsersAction is private


def add_plan(sub: Subparsers) -> None:
    """Register ``plan`` (the placement planner) and its modes on the top-level
    subparsers."""
    p = sub.add_parser(
        "plan",
        help="place and size a deployment before starting it",
        description="Without a mode: search placements (prefill and decode layouts and "
        "their counts) for WORKERS devices by simulation and print the best, with their "
        "predicted goodput, TTFT p95 and TPOT p95. Exit code 2 when none meets the SLOs.",
    )
    add_placement_args(p)
    p.set_defaults(run=lambda args: _plan_placements(args, p))
    modes = p.add_subparsers(dest="plan_command", metavar="{memory}")
    _add_memory(modes)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _add_memory(modes: Subparsers) -> None:
    p = modes.add_parser(
        "memory",
        help="weights per rank, KV blocks and concurrent sequences for a layout",
        description="Size one instance of layout (tp, pp) on devices of a given memory: "
        "weights per rank, KV bytes per token, KV blocks that fit and how many sequences "
        "of the context length run at once. Exit code 2 when the layout is invalid or "
        "the model does not fit.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--device-memory", required=True, help="memory of one device, e.g. 80GiB, 24GB")
    p.add_argument(
        "--reserve",
        type=_fraction,
        default=0.2,
        help="fraction of device memory kept free for activations and runtime (default 0.2)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    p.add_argument(
        "--pp-boundaries",
        type=pp_boundaries,
        default=None,
        help="first layer of stages 1..pp-1, comma-separated, e.g. 1,3 (default: balanced)",
    )
    p.add_argument("--context-len", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weight and KV dtype; auto = the checkpoint's torch_dtype",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(run=_plan_memory)


def _plan_memory(args: argparse.Namespace) -> int:
    cfg = ModelConfig.from_pretrained(args.model)
    plan = plan_memory(
        cfg,
        parse_bytes(args.device_memory),
        args.reserve,
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        block_size=args.block_size,
        context_len=args.context_len,
        pp_boundaries=args.pp_boundaries,
    )
    if args.json:
        print(json.dumps({"model": str(args.model), **dataclasses.asdict(plan)}))
    else:
        print(format_plan(plan, cfg, str(args.model)))
    if not plan.fits:
        print(f"pdserve plan memory: error: model does not fit: {plan.reason}", file=sys.stderr)
        return 2
    return 0


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """The placement planner's flags. Required ones, devices and affinities are
    checked when it runs (``bench.planner`` is imported only then, and ``plan memory``
    needs none of them)."""
    p.add_argument("--model", help="model directory (config.json; weights only for cpu)")
    p.add_argument("--workers", type=int, help="devices (GPUs, or CPU workers) to place on")
    p.add_argument("--device", default="h100", help="h100 (default), h200, a100 or cpu")
    p.add_argument("--slo-ttft", type=float, metavar="MS", help="TTFT SLO in milliseconds")
    p.add_argument("--slo-tpot", type=float, metavar="MS", help="TPOT SLO in milliseconds")
    p.add_argument(
        "--dataset",
        default="azure-conv",
        help="azure-conv (default), azure-code, synthetic or FILE.jsonl",
    )
    p.add_argument("--num-requests", type=int, default=400, help="per simulation (default 400)")
    p.add_argument("--top", type=int, default=5, help="placements to print (default 5)")
    p.add_argument(
        "--affinity",
        default="both",
        help="high (Algorithm 1: fast links between nodes), low (Algorithm 2) or both (default)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--reserve", type=_fraction, default=0.2, help="kept free (default 0.2)")
    p.add_argument(
        "--latency-model",
        metavar="FILE",
        help="measured step times of one worker (LatencyModel.to_dict() JSON): tp=pp=1 only",
    )
    p.add_argument(
        "--calibration", metavar="FILE", help="JSON of Calibration fields (bench.planner)"
    )
    p.add_argument("--internode-gbps", type=float, help="network per GPU between nodes, Gb/s")
    p.add_argument("--threads", type=int, default=1, help="threads per CPU worker (cpu)")
    p.add_argument("--policy", default="slo_aware", help="routing policy (default slo_aware)")
    p.add_argument("--seed", type=int, default=0)


def _plan_placements(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from bench.planner.plan import PlanOptions, run_plan
    from bench.planner.report import format_result, result_json

    missing = [
        flag
        for flag, value in (
            ("--model", args.model),
            ("--workers", args.workers),
            ("--slo-ttft", args.slo_ttft),
            ("--slo-tpot", args.slo_tpot),
        )
        if value is None
    ]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or a mode)")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    options = PlanOptions(
        device=args.device,
        dataset=args.dataset,
        num_requests=args.num_requests,
        affinity=args.affinity,
        dtype=args.dtype,
        reserve=args.reserve,
        policy=args.policy,
        latency_model=args.latency_model,
        calibration=args.calibration,
        internode_gbps=args.internode_gbps,
        threads=args.threads,
        seed=args.seed,
    )
    progress = not args.json and sys.stderr.isatty()
    result = run_plan(args.model, args.workers, args.slo_ttft, args.slo_tpot, options, progress)
    if args.json:
        print(json.dumps({"model": str(args.model), **result_json(result, args.top)}))
    else:
        print(format_result(result, args.top))
    if not result.placements or result.placements[0].goodput <= 0:
        print("pdserve plan: error: no placement meets the SLOs", file=sys.stderr)
        return 2
    return 0


def _devices(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def format_plan(plan: MemoryPlan, cfg: ModelConfig, model: str) -> str:
    """The plan as an aligned two-column table."""
    shape = (
        f"{cfg.model_type}, {cfg.num_layers} layers, {cfg.num_heads} heads / "
        f"{cfg.num_kv_heads} KV heads x {cfg.head_dim}"
    )
    rows = [
        ("model", f"{model} ({shape})"),
        ("layout", f"tp={plan.tp} pp={plan.pp} ({_devices(plan.tp * plan.pp)}), {plan.dtype}"),
        (
            "device memory",
            f"{format_bytes(plan.device_memory_bytes)}, reserve {plan.reserve:.0%} "
            f"-> {format_bytes(plan.budget_per_rank)} usable per rank",
        ),
        (
            "weights per rank",
            f"{format_bytes(plan.weights_per_rank)} ({plan.weights_per_rank:,} B)",
        ),
        ("KV bytes per token", f"{plan.kv_bytes_per_token:,} B per rank"),
        ("KV block", f"{plan.block_size} tokens = {plan.kv_block_bytes:,} B"),
        ("KV blocks", f"{plan.kv_blocks:,}"),
        ("KV tokens", f"{plan.kv_tokens:,}"),
        ("context length", f"{plan.context_len:,} tokens = {plan.blocks_per_seq:,} blocks"),
        ("max concurrent seqs", f"{plan.max_concurrent_seqs:,}"),
        ("fits", "yes" if plan.fits else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
