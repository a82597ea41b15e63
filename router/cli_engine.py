"""CLI subcommands that run the engine in this process: make-model, generate."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from decode.llm import LLM

DEFAULT_MODEL_DIR = Path(os.environ.get("PDSERVE_HOME", "models")) / "llama-small"

Subparsers = Any  # argparse's _SubParsersAction is private


def add_make_model(sub: Subparsers) -> None:
    from engine.make_model import ARCHS, PRESETS

    p = sub.add_parser("make-model", help="write a random-weight Hugging Face checkpoint")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_make_model)


def _make_model(args: argparse.Namespace) -> int:
    from engine.make_model import make_model

    path = make_model(args.arch, args.preset, args.out, seed=args.seed)
    print(path)
    return 0


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (per worker)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (Ray workers)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (Ray workers)")
    p.add_argument(
        "--pp-microbatches",
        type=int,
        default=None,
        help="micro-batches per step with --pp > 1 (default: one per stage)",
    )
    p.add_argument(
        "--pp-boundaries",
        type=pp_boundaries,
        default=None,
        help="first layer of stages 1..pp-1, comma-separated, e.g. 1,3 (default: balanced)",
    )
    p.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel degree for MoE models: divides tp, or a multiple of it "
        "(then ep ranks per stage)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to run the workers on (default: start a local one when tp x pp > 1)",
    )


def add_generate(sub: Subparsers) -> None:
    p = sub.add_parser("generate", help="offline generation in one process")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-token-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print token_ids, text, finish_reason")
    _add_engine_args(p)
    from router.cli_cluster import add_disaggregated_args

    add_disaggregated_args(p)
    p.set_defaults(run=_generate)


def engine_config(args: argparse.Namespace, model: str) -> Any:
    from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig

    return EngineConfig(
        model=model,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.threads,
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_bytes=args.kv_cache_bytes,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            chunked_prefill=not args.no_chunked_prefill,
        ),
        parallel=ParallelConfig(
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            pp_microbatches=args.pp_microbatches,
            pp_boundaries=args.pp_boundaries,
        ),
    )


def make_llm(args: argparse.Namespace, model: str) -> LLM:
    """The engine for ``args``: in this process, or on Ray workers when the layout has
    several ranks or ``--address`` names a cluster."""
    from decode.llm import LLM

    config = engine_config(args, model)
    if config.parallel.world_size == 1 and args.address is None:
        return LLM(config)
    from engine.executor import RayExecutor

    executor = RayExecutor(config, address=args.address)
    try:
        return LLM(config, executor)
    except BaseException:
        executor.shutdown()
        raise


def pp_boundaries(text: str) -> tuple[int, ...]:
    """``--pp-boundaries``: comma-separated layer indices, e.g. "1,3" -> (1, 3)."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated layer indices, e.g. 1,3; got {text!r}"
        ) from None


def parse_token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ValueError(
            f"--prompt-token-ids must be comma-separated integers, got {text!r}"
        ) from e


def _generate(args: argparse.Namespace) -> int:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
    )
    prompt: str | list[int] = (
        args.prompt if args.prompt is not None else parse_token_ids(args.prompt_token_ids)
    )
    if args.disaggregated:
        from router.cli_cluster import generate_disaggregated

        return generate_disaggregated(args, prompt, params)
    llm = make_llm(args, args.model)
    try:
        out = llm.generate([prompt], params)[0]
    finally:
        llm.shutdown()
    if args.json:
        print(
            json.dumps(
                {"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}
            )
        )
    else:
        print(out.text)
    return 0


def ensure_builtin_model(path: Path = DEFAULT_MODEL_DIR) -> Path:
    """The built-in small model, written on first use (random weights, real format)."""
    if not (path / "config.json").is_file():
        from engine.make_model import make_model

        print(f"writing the built-in model to {path} ...")
        make_model("llama", "small", path, seed=0)
    return path
