"""`pdserve plan ...`: size deployments from a checkpoint's config (no torch, no device).

``plan`` is a group of modes (``plan memory`` now; more layouts planning later), each a
nested subcommand registered in ``add_plan``.
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
    """Register ``plan`` and its modes on the top-level subparsers."""
    p = sub.add_parser("plan", help="size a deployment before starting it")
    modes = p.add_subparsers(dest="plan_command", required=True)
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
