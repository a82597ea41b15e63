"""Roofline calibration: how close our engine's steps come to the device's ceilings.

Run: ``python -m bench.calibrate [--device cuda] [--layers 4,12] [--out FILE]``.

Measures, in one run on one device: the two ceilings (a large bf16 matrix product's
FLOP/s and a large device copy's bytes/s, read + written), then our engine's real
forward steps (the router's profiling path: ``executor.execute`` over synthetic
sequences) on Llama-3-8B-shaped models cut to two depths (``--layers``; random
weights made by ``make_model``, so every GEMM has a real 8B layer's shape). For each prefill
step it prints the achieved FLOP/s as a fraction of the measured matmul ceiling (MFU);
for each decode step the bytes it must read (weights + the batch's KV) as a fraction
of the copy ceiling (MBU). From both depths it derives the planner's ``Calibration``
(bench/planner/devices.py): compute and KV-read efficiency against the published
figures, and the host's fixed and per-layer cost of a step (batch-1 decode is bound
by launching kernels, not by the device). Writes JSON to ``--out``; its
``calibration`` object is a file for ``pdserve plan --calibration``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.engine_workers import RESULTS, copy_bandwidth_gb_s, sync

# A Llama-3-8B decoder layer; vocab and max length stay the medium preset's.
LLAMA3_8B_LAYER = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
PREFILL_POINTS = ([512], [2048], [4096], [512] * 8)
DECODE_BATCHES = (1, 8, 32, 128)
DECODE_CONTEXT = 1024  # tokens per sequence


def matmul_tflops(device: str, n: int = 8192, repeats: int = 10) -> float:
    """bf16 n×n×n products on random data, mean over ``repeats`` after 3 warm-ups."""
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


def model_dir(layers: int) -> Path:
    path = Path("models") / f"calib-llama3-8b-shape-{layers}l"
    if not (path / "config.json").is_file():
        from engine.make_model import make_model

        overrides = {**LLAMA3_8B_LAYER, "num_hidden_layers": layers}
        make_model("llama", "medium", path, 0, "bfloat16", 2**31, overrides)
    return path


def linear_params(cfg: Any) -> tuple[int, int]:
    """(matmul parameters of the decoder layers, of the LM head)."""
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size
    per_layer += 3 * cfg.hidden_size * cfg.intermediate_size
    return per_layer * cfg.num_layers, cfg.vocab_size * cfg.hidden_size


def prefill_flops(cfg: Any, lengths: list[int]) -> float:
    """Matmul FLOPs of one prefill step: every token through the layers, the last of
    each prompt through the LM head, and causal attention (QKᵀ and PV, half the square)."""
    layers, head = linear_params(cfg)
    attn = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * sum(n * n for n in lengths)
    return 2 * layers * sum(lengths) + 2 * head * len(lengths) + attn


def decode_bytes(cfg: Any, batch: int, context: int, kv_per_token: int) -> float:
    """Bytes one decode step must read: every weight once (bf16) and the batch's KV."""
    layers, head = linear_params(cfg)
    return 2 * (layers + head) + batch * context * kv_per_token


def time_points(llm: Any, repeats: int) -> list[dict[str, Any]]:
    """Median seconds of each prefill and decode point (the first run warms up)."""
    from router.routing import timed_step

    points = [("prefill", lengths) for lengths in PREFILL_POINTS]
    points += [("decode", [DECODE_CONTEXT] * b) for b in DECODE_BATCHES]
    rows = []
    for kind, lengths in tqdm(points, desc="steps"):
        runs = [timed_step(llm, lengths, kind == "prefill") for _ in range(repeats + 1)][1:]
        times = [t for t in runs if t is not None]
        if len(times) < len(runs):
            raise RuntimeError(f"{kind} {lengths[:1]}x{len(lengths)} does not fit the KV cache")
        rows.append({"kind": kind, "lengths": lengths, "seconds": statistics.median(times)})
    return rows


def analyse(rows: list[dict[str, Any]], cfg: Any, kv: int, tflops: float, gbs: float) -> None:
    for row in rows:
        lengths, s = row["lengths"], row["seconds"]
        if row["kind"] == "prefill":
            row["tflop_s"] = prefill_flops(cfg, lengths) / s / 1e12
            row["mfu"] = row["tflop_s"] / tflops
        else:
            row["gb_s"] = decode_bytes(cfg, len(lengths), DECODE_CONTEXT, kv) / s / 1e9
            row["mbu"] = row["gb_s"] / gbs


def measure_depth(args: argparse.Namespace, layers: int, ceilings: tuple[float, float]) -> Any:
    """Times the points on a model of ``layers`` layers; its report."""
    from decode.llm import LLM
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.layout import kv_bytes_per_token
    from router.latency_model import DecodeSample, LatencyModel, PrefillSample

    path = model_dir(layers)
    cache = CacheConfig(kv_cache_bytes=int(args.kv_cache_gib * 2**30), enable_prefix_caching=False)
    config = EngineConfig(
        model=str(path),
        dtype="bfloat16",
        device=args.device,
        cache=cache,
        scheduler=SchedulerConfig(max_num_seqs=max(DECODE_BATCHES)),  # graphs cover all
        cuda_graphs=not args.eager,
    )
    llm = LLM(config)
    cfg = llm.model_config
    kv = kv_bytes_per_token(cfg, "bfloat16", 1)
    rows = time_points(llm, args.repeats)
    llm.shutdown()
    analyse(rows, cfg, kv, *ceilings)
    model = LatencyModel()
    model.fit(
        PrefillSample(tuple(r["lengths"]), r["seconds"])
        if r["kind"] == "prefill"
        else DecodeSample(len(r["lengths"]), sum(r["lengths"]), r["seconds"])
        for r in rows
    )
    print(f"-- {layers} layers")
    for r in rows:
        n = f"{r['lengths'][0]}x{len(r['lengths'])}"
        frac = f"MFU {r['mfu']:.2f}" if r["kind"] == "prefill" else f"MBU {r['mbu']:.2f}"
        print(f"{r['kind']:<8}{n:>10}{r['seconds'] * 1e3:10.2f} ms   {frac}")
    params = sum(linear_params(cfg))
    return {
        "model": {"layers": layers, "linear_params": params, "kv_bytes_per_token": kv},
        "steps": rows,
        "latency_model": model.to_dict(),
    }


def calibration(depths: list[dict[str, Any]], published: Any, name: str) -> dict[str, Any]:
    """``bench.planner.devices.Calibration`` fields from two depths: the prefill FLOP/s
    and the decode KV-read GB/s as fractions of the published figures, and the host's
    per-layer launch time and fixed step cost from batch-1 decode at both depths."""
    shallow, deep = depths[0], depths[-1]
    big = [r for r in deep["steps"] if r["kind"] == "prefill" and sum(r["lengths"]) >= 2048]
    flops = statistics.median(r["tflop_s"] for r in big) * 1e12
    dec = {len(r["lengths"]): r["seconds"] for r in deep["steps"] if r["kind"] == "decode"}
    lo, hi = sorted(dec)[-2:]
    kv_bytes = (hi - lo) * DECODE_CONTEXT * deep["model"]["kv_bytes_per_token"]
    kv_gb_s = kv_bytes / (dec[hi] - dec[lo])
    b1 = [{len(r["lengths"]): r["seconds"] for r in d["steps"]}[1] for d in (shallow, deep)]
    layers = [d["model"]["layers"] for d in (shallow, deep)]
    per_layer = (b1[1] - b1[0]) / (layers[1] - layers[0])
    return {
        "compute_efficiency": round(min(1.0, flops / published.flops), 4),
        "bandwidth_efficiency": round(min(1.0, kv_gb_s / published.memory_bandwidth), 4),
        "step_overhead_s": round(max(0.0, b1[0] - layers[0] * per_layer), 5),
        "layer_dispatch_s": round(max(0.0, per_layer), 6),
        "source": f"pdserve measured on {name} (python -m bench.calibrate)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", default="4,12", help="two depths (host cost per layer)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for decode")
    p.add_argument("--kv-cache-gib", type=float, default=16.0)
    p.add_argument("--published", default="h200", help="bench.planner device of the figures")
    p.add_argument("--out", default=str(RESULTS / "calibrate.json"))
    args = p.parse_args(argv)
    from bench.planner.devices import get_device

    published = get_device(args.published, 1)
    ceilings = matmul_tflops(args.device), copy_bandwidth_gb_s(args.device, 2 << 30)
    print(f"ceilings: matmul {ceilings[0]:.0f} TFLOP/s, copy {ceilings[1]:.0f} GB/s")
    depths = [measure_depth(args, int(n), ceilings) for n in args.layers.split(",")]
    name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    result = {
        "device": name,
        "matmul_tflop_s": ceilings[0],
        "copy_gb_s": ceilings[1],
        "depths": depths,
        "calibration": calibration(depths, published, name) if len(depths) > 1 else None,
    }
    print("calibration:", json.dumps(result["calibration"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
