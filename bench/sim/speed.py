"""How fast the simulator runs: ``python -m bench.sim.speed [--requests N]
[--instances N] [--policies round_robin,slo_aware] [--colocated]``.

Requests have Azure-conversation-like lengths (log-normal: ~1150 prompt tokens and
~210 output tokens on average, seeded) and arrive as a Poisson stream at a rate that
keeps every instance busy (one request/s per instance); half the instances prefill
and half decode (or all are colocated). Prints one line per policy: wall-clock
seconds, simulated seconds, tokens, steps and tokens simulated per wall second.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.sim.config import PoolSpec, SimConfig
from bench.sim.simulate import poisson_trace, simulate
from router.latency_model import LatencyModel
from router.step_fit import Coefficients

# A 7-8B model on one GPU, roughly (as bench/router.py); Llama-3-8B's 128 KiB/token.
MODEL = (Coefficients(0.015, 7e-5, 5e-9), Coefficients(0.012, 3e-7, 2e-4))
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2


def conv_like_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (prompt_len, output_len) pairs shaped like the Azure conversation trace."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(6.8, 0.7, n), 1, 8000).astype(int)
    outputs = np.clip(rng.lognormal(4.9, 0.9, n), 1, 2000).astype(int)
    return [(int(p), int(o)) for p, o in zip(prompts, outputs, strict=True)]


def run_one(requests: int, instances: int, policy: str, colocated: bool) -> dict[str, float]:
    """One timed simulation; its figures."""
    model = LatencyModel(*MODEL)
    trace = poisson_trace(1.0 * instances, conv_like_lengths(requests), seed=1)
    pool = PoolSpec(max(1, instances // 2), model, 8192)
    if colocated:
        cfg = SimConfig(colocated=PoolSpec(instances, model, 8192), policy=policy)
    else:
        cfg = SimConfig(
            prefill=pool,
            decode=pool,
            kv_bytes_per_token=KV_BYTES_PER_TOKEN,
            bandwidth=5e9,
            policy=policy,
        )
    result = simulate(trace, cfg)
    tokens = sum(len(r.token_times) for r in result.requests)
    return {
        "wall_s": result.wall_s,
        "sim_s": result.sim_end_s,
        "tokens": tokens,
        "steps": result.summary()["steps"],
        "tokens_per_s": tokens / result.wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    """Prints the speed of each policy's run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--policies", default="round_robin,least_loaded,slo_aware")
    ap.add_argument("--colocated", action="store_true")
    args = ap.parse_args(argv)
    kind = "colocated" if args.colocated else "P+D"
    for policy in args.policies.split(","):
        f = run_one(args.requests, args.instances, policy, args.colocated)
        print(
            f"{args.requests} requests, {args.instances} instances ({kind}), {policy}: "
            f"{f['wall_s']:.2f} s wall for {f['sim_s']:.0f} s simulated, "
            f"{f['tokens']:.0f} tokens in {f['steps']:.0f} steps "
            f"({f['tokens_per_s'] / 1e6:.2f} M tokens/s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
