"""Engine benchmark: our engine vs transformers' generate on the same checkpoint.

Run: ``python -m bench.engine [--presets small,medium] [--batch-sizes 1,8,32]
[--repeats N] [--device cuda]``.
Each (system, preset) runs in its own subprocess so peak memory is its own; with
``--repeats N`` each runs N times, the systems interleaved, and every figure is the
median of its N (a shared 2-core VM drifts 20-30% between runs). Prints the ratios side
by side; writes bench/results/engine-*.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.engine_workers import RESULTS, model_dir
from engine.gemv import BLAS_ENV

SYSTEMS = ("pdserve", "transformers")


def run_worker(system: str, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.engine_workers",
        "--system",
        system,
        "--preset",
        preset,
        "--arch",
        args.arch,
        "--batch-sizes",
        args.batch_sizes,
        "--prompt-len",
        str(args.prompt_len),
        "--output-len",
        str(args.output_len),
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
        "--output-dist",
        args.output_dist,
        "--device",
        args.device,
    ]
    env = {**os.environ, **BLAS_ENV}  # as pdserve's own processes (engine/gemv.py)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{system} on {preset} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over ``runs`` (other fields from the first)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    if len(runs) > 1:
        out["runs"] = len(runs)
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if b else "  n/a"


def print_table(results: dict[str, dict[str, dict[str, Any]]], batch_sizes: list[int]) -> None:
    for preset, by_sys in results.items():
        ours, hf = by_sys["pdserve"], by_sys["transformers"]
        runs = f"; medians of {ours['runs']} runs each" if ours.get("runs") else ""
        print(f"\n== {preset}: {ours['params'] / 1e6:.1f}M params, {ours['dtype']}{runs} ==")
        print(f"{'metric':<28}{'pdserve':>12}{'transformers':>14}{'ratio':>9}")
        rows = (
            [("prefill tok/s", "prefill_tok_s")]
            + [(f"decode tok/s @ batch {b}", f"decode_tok_s_b{b}") for b in batch_sizes]
            + [("peak RSS MiB", "peak_rss_mib")]
            + ([("peak device MiB", "peak_device_mib")] if "peak_device_mib" in ours else [])
        )
        for label, key in rows:
            print(f"{label:<28}{ours[key]:>12.1f}{hf[key]:>14.1f}{ratio(ours[key], hf[key]):>9}")
        floor = ours["floor_step_ms"]
        step = 1000.0 / ours["decode_tok_s_b1"]
        print(
            f"batch-1 decode step: {step:.2f} ms; memory-bandwidth floor {floor:.2f} ms "
            f"({ours['bytes_per_step'] / 1e6:.1f} MB/step at {ours['copy_gb_s']:.1f} GB/s copy) "
            f"-> {step / floor:.2f}x the floor"
        )


def plot(results: dict[str, dict[str, dict[str, Any]]], batch_sizes: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (preset, by_sys) in zip(axes[0], results.items(), strict=True):
        for system in SYSTEMS:
            ys = [by_sys[system][f"decode_tok_s_b{b}"] for b in batch_sizes]
            ax.plot(batch_sizes, ys, marker="o", label=system)
        ax.set(title=f"{preset}: decode throughput", xlabel="batch size", ylabel="tokens/s")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", default="small,medium")
    p.add_argument("--arch", default="llama")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", help="both systems use it (auto: our choice)")
    p.add_argument(
        "--output-dist",
        default="uniform",
        choices=("uniform", "azure-conv"),
        help="output lengths: uniform in [L/2, L], or the Azure conversation trace's mix",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (both systems)")
    p.add_argument("--repeats", type=int, default=1, help="runs per system; medians shown")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    presets = args.presets.split(",")
    for preset in presets:
        model_dir(args.arch, preset)  # build checkpoints before timing anything
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    jobs = [(pr, s) for pr in presets for _ in range(args.repeats) for s in SYSTEMS]
    for preset, system in tqdm(jobs, desc="bench engine"):
        runs.setdefault((preset, system), []).append(run_worker(system, preset, args))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for (preset, system), got in runs.items():
        results.setdefault(preset, {})[system] = median_run(got)
    print_table(results, batch_sizes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"engine-{args.output_dist}" + ("" if args.device == "cpu" else f"-{args.device}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, batch_sizes, RESULTS / f"{stem}.png")
    print(f"\nwrote {RESULTS / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
