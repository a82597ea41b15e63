"""Router benchmark: how long the slo_aware policy takes to place one request.

Run: ``python -m bench.router [--sizes 8,64,512] [--decisions 2000]``. For each size
(half prefill, half decode instances with random loads and their own latency models),
with one bandwidth figure for every pair and with per-pair figures, and with local
prefill off and on, it times ``decide`` on random requests (wall clock and thread CPU
time, so a busy machine's preemptions show as the gap), plus the controller's costs
around it: updating the two chosen views (``plus``) and rebuilding every view (a stats
refresh). The target is a p99 under 1 ms at 64 instances. Prints a table; writes
bench/results/router.json and router.png. No torch.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from router.bandwidth import Bandwidth
from router.latency_model import LatencyModel
from router.policies import Policy, make_policy
from router.policy_views import DecodeView, PrefillView, RouteRequest
from router.step_fit import Coefficients

RESULTS = Path("bench/results")
TARGET_INSTANCES, TARGET_P99_US = 64, 1000.0
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # Llama-3-8B in bf16: 128 KiB per token
BLOCK_SIZE = 16
REFRESH_EVERY = 64  # decisions between two "stats refreshes" (new random views)


def make_models(n: int, rng: random.Random) -> list[LatencyModel]:
    """Latency models whose coefficients vary ±30% around a 7–8B-on-one-GPU guess."""

    def jitter(a: float, b: float, c: float) -> Coefficients:
        return Coefficients(*(v * rng.uniform(0.7, 1.3) for v in (a, b, c)))

    return [LatencyModel(jitter(0.015, 7e-5, 5e-9), jitter(0.012, 3e-7, 2e-4)) for _ in range(n)]


def make_views(
    n: int, models: list[LatencyModel], rng: random.Random
) -> tuple[list[PrefillView], list[DecodeView]]:
    """``n // 2`` prefill and ``n - n // 2`` decode views with random loads."""
    prefill = [
        PrefillView(
            f"prefill-{i}",
            queued_prefill_tokens=rng.randint(0, 16384),
            queued_requests=rng.randint(1, 8),
            blocks_free=rng.randint(0, 4096),
            block_size=BLOCK_SIZE,
            model=models[i],
            max_num_batched_tokens=4096,
        )
        for i in range(n // 2)
    ]
    decode = []
    for i in range(n - n // 2):
        batch, pending = rng.randint(0, 128), rng.randint(0, 3)
        decode.append(
            DecodeView(
                f"decode-{i}",
                batch_size=batch,
                context_tokens=batch * rng.randint(128, 4096),
                pending_handoffs=pending,
                blocks_free=rng.randint(0, 32768),
                block_size=BLOCK_SIZE,
                max_num_seqs=128,
                model=models[n // 2 + i],
                pending_tokens=pending * rng.randint(16, 4096),
            )
        )
    return prefill, decode


def make_request(
    prefill: list[PrefillView], decode: list[DecodeView], rng: random.Random
) -> RouteRequest:
    """A random prompt with a cached prefix on two random instances."""
    prompt = rng.randint(16, 4096)
    cached = {
        rng.choice(prefill).instance_id: rng.randint(0, prompt),
        rng.choice(decode).instance_id: rng.randint(0, prompt),
    }
    return RouteRequest(prompt, 2.0, 0.1, KV_BYTES_PER_TOKEN, rng.randint(16, 512), cached)


def make_bandwidth(kind: str, n: int, rng: random.Random) -> Bandwidth:
    """One 25 GB/s figure, or per-pair figures drawn from 5, 12.5 and 25 GB/s."""
    if kind == "uniform":
        return Bandwidth(25e9)
    pairs = {
        (f"prefill-{i}", f"decode-{j}"): rng.choice((5e9, 12.5e9, 25e9))
        for i in range(n // 2)
        for j in range(n - n // 2)
    }
    return Bandwidth(25e9, per_pair=pairs)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_decisions(
    policy: Policy, n: int, models: list[LatencyModel], decisions: int, rng: random.Random
) -> dict[str, list[float]]:
    """Per timed decision: wall and CPU µs of ``decide``, µs of the two ``plus``
    updates, meets (1/0), local (1/0); and µs per full view refresh."""
    out: dict[str, list[float]] = {k: [] for k in ("wall", "cpu", "plus", "meets", "local")}
    out["refresh"] = []
    prefill, decode = make_views(n, models, rng)
    index_p = {v.instance_id: i for i, v in enumerate(prefill)}
    index_d = {v.instance_id: i for i, v in enumerate(decode)}
    gc.collect()
    for k in range(-100, decisions):  # the first 100 warm up
        if k % REFRESH_EVERY == 0:
            t0 = time.perf_counter_ns()
            prefill, decode = make_views(n, models, rng)
            out["refresh"].append((time.perf_counter_ns() - t0) / 1e3)
        request = make_request(prefill, decode, rng)
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        d = policy.decide(request, prefill, decode)
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        j = index_d[d.decode_id]
        decode[j] = decode[j].plus(request, local=d.prefill_id is None)
        if d.prefill_id is not None:
            i = index_p[d.prefill_id]
            prefill[i] = prefill[i].plus(request)
        t2 = time.perf_counter_ns()
        if k >= 0:
            for key, value in zip(
                ("wall", "cpu", "plus", "meets", "local"),
                (
                    (t1 - t0) / 1e3,
                    (c1 - c0) / 1e3,
                    (t2 - t1) / 1e3,
                    d.meets_slo,
                    d.prefill_id is None,
                ),
                strict=True,
            ):
                out[key].append(float(value))
    return out


def run_case(n: int, bandwidth: str, local: int, decisions: int, seed: int) -> dict[str, Any]:
    """Times ``decisions`` decisions of one configuration; returns its row."""
    rng = random.Random(seed)
    models = make_models(n, rng)
    policy = make_policy(
        "slo_aware", bandwidth=make_bandwidth(bandwidth, n, rng), local_prefill_max_tokens=local
    )
    t = time_decisions(policy, n, models, decisions, rng)
    return {
        "instances": n,
        "prefill": n // 2,
        "decode": n - n // 2,
        "bandwidth": bandwidth,
        "local_prefill_max_tokens": local,
        "decisions": decisions,
        "p50_us": statistics.median(t["wall"]),
        "p99_us": percentile(t["wall"], 0.99),
        "p99_cpu_us": percentile(t["cpu"], 0.99),
        "mean_us": statistics.fmean(t["wall"]),
        "plus_us": statistics.median(t["plus"]),
        "refresh_us": statistics.median(t["refresh"]),
        "meets_share": statistics.fmean(t["meets"]),
        "local_share": statistics.fmean(t["local"]),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'instances':>9} {'bandwidth':>9} {'local':>5} {'p50 µs':>8} {'p99 µs':>8} "
        f"{'p99 cpu':>8} {'plus µs':>8} {'refresh µs':>10} {'meets':>6} {'local':>6}"
    )
    for r in rows:
        print(
            f"{r['instances']:>9} {r['bandwidth']:>9} {r['local_prefill_max_tokens']:>5} "
            f"{r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {r['p99_cpu_us']:>8.0f} "
            f"{r['plus_us']:>8.1f} {r['refresh_us']:>10.0f} {r['meets_share']:>6.2f} "
            f"{r['local_share']:>6.2f}"
        )


def target_met(rows: list[dict[str, Any]]) -> bool | None:
    """Whether every configuration at 64 instances has p99 < 1 ms (None: not run)."""
    at = [r for r in rows if r["instances"] == TARGET_INSTANCES]
    return all(r["p99_us"] < TARGET_P99_US for r in at) if at else None


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cases = sorted({(r["bandwidth"], r["local_prefill_max_tokens"]) for r in rows})
    for bw, local in cases:
        sel = sorted(
            (r for r in rows if (r["bandwidth"], r["local_prefill_max_tokens"]) == (bw, local)),
            key=lambda r: r["instances"],
        )
        xs = [r["instances"] for r in sel]
        label = f"{bw}, local {'on' if local else 'off'}"
        line = ax.plot(xs, [r["p99_us"] for r in sel], marker="o", label=f"p99 {label}")[0]
        ax.plot(
            xs,
            [r["p50_us"] for r in sel],
            ls="--",
            marker=".",
            color=line.get_color(),
            label=f"p50 {label}",
        )
    ax.axhline(TARGET_P99_US, color="red", lw=0.8, label="target p99 (1 ms at 64)")
    ax.set(
        xlabel="instances (half prefill, half decode)",
        ylabel="decision time (µs)",
        title="slo_aware decision time",
        xscale="log",
        yscale="log",
    )
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="8,64,512", help="instance counts (half prefill)")
    p.add_argument("--decisions", type=int, default=2000, help="timed decisions per case")
    p.add_argument(
        "--local-prefill-max-tokens", type=int, default=256, help="the 'local on' cases' threshold"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if min(sizes) < 2 or args.decisions < 1:
        raise ValueError(f"need sizes >= 2 and decisions >= 1, got {sizes}, {args.decisions}")
    cases = [
        (n, bw, local)
        for n in sizes
        for bw in ("uniform", "per-pair")
        for local in (0, args.local_prefill_max_tokens)
    ]
    rows = [
        run_case(n, bw, local, args.decisions, args.seed)
        for n, bw, local in tqdm(cases, desc="bench router")
    ]
    print_table(rows)
    met = target_met(rows)
    if met is not None:
        print(f"\ntarget p99 < 1 ms at {TARGET_INSTANCES} instances: {'met' if met else 'MISSED'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"config": vars(args), "target_met": met, "rows": rows}
    (RESULTS / "router.json").write_text(json.dumps(out, indent=2))
    plot(rows, RESULTS / "router.png")
    print(f"wrote {RESULTS / 'router'}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
