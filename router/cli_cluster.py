"""``pdserve generate --disaggregated``: one prompt through a prefill instance, the KV
transfer and a decode instance, each with its own layout, on Ray."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from engine.sampling_params import SamplingParams
from router.config import TRANSPORTS, KVTransferConfig, PoolConfig, ServeConfig

if TYPE_CHECKING:
    from router.controller import ClusterOutput


def add_disaggregated_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("disaggregated (with --disaggregated)")
    g.add_argument(
        "--disaggregated",
        action="store_true",
        help="prefill on one instance, move the KV, decode on another (Ray)",
    )
    g.add_argument("--prefill-tp", type=int, default=1)
    g.add_argument("--prefill-pp", type=int, default=1)
    g.add_argument("--decode-tp", type=int, default=1)
    g.add_argument("--decode-pp", type=int, default=1)
    g.add_argument("--transport", choices=TRANSPORTS, default="auto")


def serve_config(args: argparse.Namespace, model: str) -> ServeConfig:
    """The one-prefill, one-decode deployment the generate flags describe."""
    common: dict[str, Any] = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "chunked_prefill": not args.no_chunked_prefill,
        "kv_cache_bytes": args.kv_cache_bytes,
        "enable_prefix_caching": not args.no_prefix_caching,
        "num_threads": args.threads or 1,
    }
    return ServeConfig(
        model=model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        ray_address=args.address,
        prefill=PoolConfig(tp=args.prefill_tp, pp=args.prefill_pp, **common),
        decode=PoolConfig(tp=args.decode_tp, pp=args.decode_pp, **common),
        kv=KVTransferConfig(transport=args.transport),
    )


async def _run(
    config: ServeConfig, prompt: str | list[int], params: SamplingParams
) -> ClusterOutput:
    from router.controller import Controller

    async with Controller(config) as controller:
        last: ClusterOutput | None = None
        async for update in controller.generate(prompt, params):
            last = update
        controller.check_invariants()
    if last is None:
        raise RuntimeError("the request produced no output")
    return last


def generate_disaggregated(
    args: argparse.Namespace, prompt: str | list[int], params: SamplingParams
) -> int:
    """Runs one prompt disaggregated and prints its text (or JSON with the transfer)."""
    config = serve_config(args, args.model)
    result = asyncio.run(_run(config, prompt, params))
    out = result.output
    if not args.json:
        print(out.text)
        return 0
    transfer = result.transfer
    print(
        json.dumps(
            {
                "token_ids": out.token_ids,
                "text": out.text,
                "finish_reason": out.finish_reason,
                "prefill_instance": result.prefill_instance,
                "decode_instance": result.decode_instance,
                "transfer": None
                if transfer is None
                else {**asdict(transfer), "seconds": transfer.seconds, "gbps": transfer.gbps},
                "timings": result.timings,
            }
        )
    )
    return 0
