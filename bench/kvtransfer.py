"""KV transfer benchmark: each transport against the raw floor of its path, same run.

Run: ``python -m bench.kvtransfer [--tokens 512,2048,8192] [--repeats 5]
[--transports grpc,local]``.
Moves the KV of one prompt (``small`` preset geometry, the engine's CPU dtype) from one
Ray actor to another (TP1 -> TP1, blocks scattered at random in both caches) with every
transport, and measures in the same run, between the same two processes, the floor of
its path: a plain TCP socket stream of the same bytes on loopback (grpc, gloo) and a
plain memcpy of the same bytes (local: straight into the destination's shared pool,
and through the two-copy ring for comparison; the same memcpy from cold caches is
shown too, held against the warm one). It also streams the same bytes through
the gRPC library alone (no KV plan, gather or scatter: the ceiling of any gRPC
transport on this machine; with the copies a KV transport makes, and with none), held
against the socket too (``bench/kv_floors.py``). Transfer times are end to end
at the driver (actor calls included); floors are timed inside the workers (pure data
path). Each figure is the median of ``--repeats`` runs, interleaved. Also prints the
transfer time as a share of the prompt's TTFT (prefill of the real engine,
``max_tokens=1``).
Writes bench/results/kvtransfer.json and kvtransfer.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.engine_workers import RESULTS, model_dir
from bench.kv_floors import BenchHolder
from kvtransfer.layout import KVShape, Move
from kvtransfer.transport import make_transport
from kvtransfer.worker import remote_class

# name, make_transport arguments, floor it is held against, target ratio
TRANSPORTS: list[tuple[str, str, dict[str, Any], str, float]] = [
    ("grpc", "grpc", {}, "socket", 0.6),
    ("gloo", "gloo", {}, "socket", 0.0),
    ("local", "local", {}, "memcpy", 0.5),
    ("local/ring", "local", {"direct": False}, "memcpy", 0.0),
    ("local/object-store", "local", {"via": "object_store"}, "memcpy", 0.0),
]
# The gRPC library alone streaming the same bytes between the same processes (no KV
# plan, gather or scatter): what any gRPC transport here could reach, timed in the
# worker; with the copies any KV transport makes (out of the cache, into the other),
# and without any (messages built beforehand, dropped on arrival).
BARE = "grpc (library alone)"
BARE_NO_COPIES = "grpc (lib, no copies)"
# The same memcpy with the caches evicted first: the state of the transfers' source
# blocks here (written at start, read by the other transports and floors since).
MEMCPY_COLD = "memcpy (cold caches)"
FLOORS: list[tuple[str, str, dict[str, Any], str, float]] = [
    (BARE, "", {}, "socket", 0.0),
    (BARE_NO_COPIES, "", {}, "socket", 0.0),
    (MEMCPY_COLD, "", {}, "memcpy", 0.0),
]
WARMUP = 2
# As recommended for engine workers: without it each of the first ~16 gRPC pulls of a
# worker warms a new malloc arena (the client's per-call thread) and runs ~2x slower.
WORKER_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "2"}}


def engine_dtype(path: Path) -> str:
    from engine.model_runner import resolve_dtype

    config = json.loads((path / "config.json").read_text())
    return resolve_dtype("auto", config.get("torch_dtype", "float32"), "cpu")


def kv_shape(path: Path) -> KVShape:
    """The checkpoint's KV geometry with the engine's CPU compute dtype."""
    from engine.model_config import ModelConfig

    cfg = ModelConfig.from_pretrained(path)
    return KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, engine_dtype(path))


def long_context(path: Path, max_len: int, out: Path) -> Path:
    """``path`` with max_position_embeddings raised to ``max_len`` (same weights)."""
    config = json.loads((path / "config.json").read_text())
    if config["max_position_embeddings"] >= max_len:
        return path
    out.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    config["max_position_embeddings"] = max_len
    (out / "config.json").write_text(json.dumps(config))
    return out


def measure_ttft(path: Path, tokens: list[int], repeats: int, threads: int) -> dict[int, float]:
    """Median seconds to the first token of one prompt of each length (engine, CPU)."""
    from decode.llm import LLM
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.sampling_params import SamplingParams

    cfg = EngineConfig(
        model=str(path),
        num_threads=threads,
        cache=CacheConfig(kv_cache_bytes=1 << 30, enable_prefix_caching=False),
        scheduler=SchedulerConfig(),  # the engine's defaults (chunked prefill)
    )
    llm = LLM(cfg)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([[rng.randrange(10, 4000) for _ in range(64)]], params)  # warm-up
    out: dict[int, float] = {}
    for n in tqdm(tokens, desc="TTFT"):
        times = []
        for _ in range(repeats):
            prompt = [rng.randrange(10, 4000) for _ in range(n)]
            t0 = time.monotonic()
            (res,) = llm.generate([prompt], params)
            times.append((res.first_token_time or time.monotonic()) - t0)
        out[n] = statistics.median(times)
    llm.shutdown()
    return out


async def floor_socket(src: Any, dst: Any, nbytes: int) -> float:
    port = await dst.socket_open.remote()
    _, seconds = await asyncio.gather(
        src.socket_send.remote(port, nbytes), dst.socket_recv.remote(nbytes)
    )
    return float(seconds)


async def measure_transfers(
    shape: KVShape,
    tokens: list[int],
    repeats: int,
    src: Any,
    dst: Any,
    num_blocks: int,
    labels: list[str],
) -> dict[int, dict[str, list[float]]]:
    """Seconds per repeat: each transport of ``labels`` and each floor, interleaved."""
    transports = {
        label: make_transport(name, **opts)
        for label, name, opts, _, _ in TRANSPORTS
        if label in labels
    }
    rng = random.Random(1)
    bare = await src.grpc_bare_address.remote()
    out: dict[int, dict[str, list[float]]] = {}
    bar = tqdm(total=len(tokens) * (WARMUP + repeats), desc="transfers")
    for n in tokens:
        blocks = -(-n // shape.block_size)
        move = Move(
            0,
            0,
            range(shape.num_layers),
            range(shape.num_kv_heads),
            tuple(rng.sample(range(num_blocks), blocks)),
            tuple(rng.sample(range(num_blocks), blocks)),
        )
        nbytes = move.num_bytes(shape)
        keys = [*transports, "socket", "memcpy", "calls", *(f[0] for f in FLOORS)]
        times: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(WARMUP + repeats):  # warm-up: channels, buffers, malloc arenas
            for label, t in transports.items():
                stats = await t.transfer(f"r{n}-{r}", [move], shape, [src], [dst], 120.0)
                times[label].append(stats.seconds)
            times["socket"].append(await floor_socket(src, dst, nbytes))
            times["memcpy"].append(float(await dst.memcpy_seconds.remote(nbytes)))
            times[MEMCPY_COLD].append(float(await dst.memcpy_seconds.remote(nbytes, True)))
            times[BARE].append(float(await dst.grpc_bare_pull.remote(bare, nbytes)))
            times[BARE_NO_COPIES].append(
                float(await dst.grpc_bare_pull.remote(bare, nbytes, False))
            )
            t0 = time.perf_counter()  # the fixed cost: one empty call on each actor
            await asyncio.gather(src.pid.remote(), dst.pid.remote())
            times["calls"].append(time.perf_counter() - t0)
            bar.update(1)
        out[n] = {k: v[WARMUP:] for k, v in times.items()}
    bar.close()
    for t in transports.values():
        t.close()
    return out


def summarize(
    shape: KVShape, times: dict[int, dict[str, list[float]]], ttft: dict[int, float]
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for n, by in times.items():
        nbytes = (
            n // shape.block_size * shape.num_layers * shape.num_kv_heads * shape.head_block_bytes
        )
        med = {k: statistics.median(v) for k, v in by.items()}
        row: dict[str, Any] = {"bytes": nbytes, "ttft_s": ttft.get(n), "calls_s": med["calls"]}
        for label, _, _, floor, target in [*TRANSPORTS, *FLOORS]:
            if label not in med:  # a transport left out (--transports)
                continue
            s = med[label]
            row[label] = {
                "seconds": s,
                "gb_s": nbytes / s / 1e9,
                "floor": floor,
                "floor_gb_s": nbytes / med[floor] / 1e9,
                "ratio": med[floor] / s,
                "target": target,
                "ttft_share": s / ttft[n] if ttft.get(n) else None,
            }
        rows[str(n)] = row
    return rows


HEADER = (
    f"{'transport':<20}{'ms':>8}{'GB/s':>8}   {'floor':<8}{'GB/s':>7}"
    f"{'ratio':>8}{'target':>8}{'% TTFT':>9}"
)


def print_table(shape: KVShape, rows: dict[str, Any]) -> None:
    geo = f"{shape.num_layers} layers x {shape.num_kv_heads} KV heads x {shape.head_dim}"
    for n, row in rows.items():
        ttft = f"TTFT {row['ttft_s']:.3f} s" if row["ttft_s"] else "TTFT not measured"
        mib = row["bytes"] / 2**20
        print(f"\n== {n} tokens: {mib:.1f} MiB of KV ({shape.dtype}, {geo}); {ttft}")
        print(f"   (an empty call on both actors: {1e3 * row['calls_s']:.2f} ms)")
        print(HEADER)
        for label, r in ((k, v) for k, v in row.items() if isinstance(v, dict)):
            target = f"{r['target']:.2f}" if r["target"] else "-"
            share = f"{100 * r['ttft_share']:.1f}%" if r["ttft_share"] is not None else "-"
            print(
                f"{label:<20}{1e3 * r['seconds']:>8.2f}{r['gb_s']:>8.2f}   {r['floor']:<8}"
                f"{r['floor_gb_s']:>7.2f}{r['ratio']:>7.2f}x{target:>8}{share:>9}"
            )


def plot(rows: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(rows.values()))
    labels = [t[0] for t in [*TRANSPORTS, *FLOORS] if t[0] in first]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [row[label]["ratio"] for row in rows.values()], width, label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [f"{n} tok" for n in rows])
    ax.set(ylabel="share of the raw floor (socket / memcpy)", title="KV transfer vs raw floor")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", default="512,2048,8192")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ttft-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="engine threads for the TTFT")
    p.add_argument("--no-ttft", action="store_true", help="skip the engine's TTFT")
    names = ",".join(t[0] for t in TRANSPORTS)
    p.add_argument("--transports", default=names, help=f"which of {names} (floors: always)")
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    labels = args.transports.split(",")
    if unknown := set(labels) - {t[0] for t in TRANSPORTS}:
        p.error(f"unknown transports {sorted(unknown)}; choose from {names}")
    path = model_dir("llama", "small")
    shape = kv_shape(path)
    ttft: dict[int, float] = {}
    if not args.no_ttft:
        with tempfile.TemporaryDirectory() as tmp:
            long = long_context(path, max(tokens) + 256, Path(tmp) / "small")
            ttft = measure_ttft(long, tokens, args.ttft_repeats, args.threads)
    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="pdray-"),
    )
    num_blocks = max(tokens) // shape.block_size + 64
    actor = remote_class(BenchHolder).options(num_cpus=0.5, runtime_env=WORKER_ENV)
    layers, heads = range(shape.num_layers), range(shape.num_kv_heads)
    geo = (num_blocks, shape.block_size, shape.head_dim, shape.dtype)
    # The destination's pool is shared, as a decode worker's is under the local transport.
    src = actor.remote(layers, heads, *geo, seed=0)
    dst = actor.remote(layers, heads, *geo, seed=1, shared=True)
    times = asyncio.run(
        measure_transfers(shape, tokens, args.repeats, src, dst, num_blocks, labels)
    )
    ray.shutdown()
    rows = summarize(shape, times, ttft)
    print_table(shape, rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kvtransfer.json").write_text(
        json.dumps({"shape": vars(shape), "rows": rows}, indent=2)
    )
    plot(rows, RESULTS / "kvtransfer.png")
    print(f"\nwrote {RESULTS / 'kvtransfer'}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
