"""Layout benchmark: decode step time, prefill time and collectives per step for each
instance layout (TP, PP, EP) on the same checkpoint.

Run: ``python -m bench.layouts [--preset small] [--arch llama|qwen3|qwen3_moe]``.
TP=1 runs in this process; every other layout runs as Ray workers (a local cluster of
4 logical CPUs, fractional CPUs per worker). A layout the code or the model cannot take
is printed as "not available" with the reason. Writes bench/results/layouts.json and
layouts.png. Times are medians; on a 2-core machine several ranks share cores, so
multi-rank layouts measure overheads (collectives, stage hand-offs), not speed-ups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.engine_workers import RESULTS, model_dir
from engine.config import CacheConfig, EngineConfig, ParallelConfig
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, SeqStep
from engine.sampling_params import SamplingParams

BLOCK = 16
DECODE_PROMPT = 16  # tokens each decode sequence starts from
GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


LAYOUTS = [
    Layout("TP=1"),
    Layout("TP=2", tp=2),
    Layout("PP=2", pp=2),
    Layout("TP=2xPP=2", tp=2, pp=2),
    Layout("TP=2xEP=2", tp=2, ep=2),
]


def blocks(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def engine_config(path: Path, layout: Layout, args: argparse.Namespace) -> EngineConfig:
    """Raises ValueError when this code base refuses the layout."""
    per_seq = -(-(DECODE_PROMPT + args.warmup + args.steps + 1) // BLOCK)
    prompt_blocks = -(-args.prompt_len // BLOCK)
    return EngineConfig(
        model=str(path),
        dtype="float32",
        num_threads=args.threads,
        cache=CacheConfig(num_blocks=prompt_blocks + args.batch * per_seq, block_size=BLOCK),
        parallel=ParallelConfig(tp=layout.tp, pp=layout.pp, ep=layout.ep),
    )


def make_executor(config: EngineConfig, layout: Layout) -> Any:
    """The instance: this process's ModelRunner, or Ray workers (imported lazily, so a
    TP=1-only run never starts Ray)."""
    model_cfg = ModelConfig.from_pretrained(config.model)
    config.parallel.check_model(model_cfg)
    if layout.world_size == 1:
        return ModelRunner(config, model_cfg)
    from engine.executor import RayExecutor

    return RayExecutor(config, num_cpus_per_worker=4.0 / layout.world_size)


def unapplied_ep(executor: Any, layout: Layout) -> str | None:
    """Why the workers would silently run ``layout`` as plain TP, or None: a worker
    that applies ep reports its ``ep_size`` in ``stats()``."""
    if layout.ep == 1:
        return None
    got = {int(s.get("ep_size", 1)) for s in executor.stats()}
    if got != {layout.ep}:
        return f"workers report ep_size {sorted(got)}, not {layout.ep} (worker hook missing)"
    return None


def collectives(executor: Any) -> dict[str, int]:
    """Collectives entered so far: rank 0's and the sum over all ranks."""
    if hasattr(executor, "stats"):
        ranks = executor.stats()
    else:  # in-process: its one ParallelContext
        pc = executor.pc
        ranks = [{"num_all_reduces": pc.num_all_reduces, "num_all_gathers": pc.num_all_gathers}]
    keys = ("num_all_reduces", "num_all_gathers")
    out = {f"rank0_{k}": int(ranks[0][k]) for k in keys}
    out.update({f"total_{k}": sum(int(r[k]) for r in ranks) for k in keys})
    return out


def time_prefill(executor: Any, args: argparse.Namespace, vocab: int) -> float:
    """Median seconds of one ``prompt_len``-token prefill (after one warm-up)."""
    prompt = [(7 * i + 3) % vocab for i in range(args.prompt_len)]
    table = blocks(0, -(-args.prompt_len // BLOCK))
    times = []
    for rep in range(args.prefill_reps + 1):
        t0 = time.perf_counter()
        executor.execute([SeqStep(f"p{rep}", prompt, 0, table, True, GREEDY)])
        times.append(time.perf_counter() - t0)
        executor.free([f"p{rep}"])
    return statistics.median(times[1:])


def time_decode(
    executor: Any, args: argparse.Namespace, vocab: int
) -> tuple[float, dict[str, int]]:
    """Median seconds of a decode step of ``batch`` sequences, and the collectives one
    such step costs (counter differences around the last step)."""
    first = -(-args.prompt_len // BLOCK)
    per_seq = -(-(DECODE_PROMPT + args.warmup + args.steps + 1) // BLOCK)
    ids = [f"d{i}" for i in range(args.batch)]
    tables = [blocks(first + i * per_seq, per_seq) for i in range(args.batch)]
    prompts = [[(11 * i + j) % vocab for j in range(DECODE_PROMPT)] for i in range(args.batch)]
    out = executor.execute(
        [SeqStep(r, p, 0, t, True, GREEDY) for r, p, t in zip(ids, prompts, tables, strict=True)]
    )
    tokens = [int(t) for t in out.token_ids]
    times: list[float] = []
    before: dict[str, int] = {}
    for step in range(args.warmup + args.steps):
        pos = DECODE_PROMPT + step
        if step == args.warmup + args.steps - 1:
            before = collectives(executor)
        t0 = time.perf_counter()
        out = executor.execute(
            [
                SeqStep(r, [tok], pos, t, True, GREEDY)
                for r, tok, t in zip(ids, tokens, tables, strict=True)
            ]
        )
        times.append(time.perf_counter() - t0)
        tokens = [int(t) for t in out.token_ids]
    after = collectives(executor)
    executor.free(ids)
    return statistics.median(times[args.warmup :]), {k: after[k] - before[k] for k in after}


def run_layout(path: Path, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"layout": layout.name, "tp": layout.tp, "pp": layout.pp}
    row["ep"] = layout.ep
    try:
        executor = make_executor(engine_config(path, layout, args), layout)
    except ValueError as e:  # the code base or the model refuses this layout
        return {**row, "available": False, "reason": str(e)}
    except Exception as e:  # a failing layout must not lose the others' figures
        return {**row, "available": False, "reason": f"failed: {type(e).__name__}: {e}"}
    try:
        missing = unapplied_ep(executor, layout)
        if missing is not None:
            return {**row, "available": False, "reason": missing}
        vocab = ModelConfig.from_pretrained(path).vocab_size
        row["prefill_s"] = time_prefill(executor, args, vocab)
        row["decode_step_s"], row["collectives_per_decode_step"] = time_decode(
            executor, args, vocab
        )
    finally:
        if hasattr(executor, "shutdown"):
            executor.shutdown()
    return {**row, "available": True}


def report(rows: list[dict[str, Any]], title: str) -> str:
    lines = [title, f"{'layout':<12} {'decode ms':>10} {'prefill ms':>11}  collectives/step"]
    for r in rows:
        if not r["available"]:
            lines.append(f"{r['layout']:<12} not available: {r['reason']}")
            continue
        c = r["collectives_per_decode_step"]
        coll = (
            f"rank0 {c['rank0_num_all_reduces']} all-reduce + "
            f"{c['rank0_num_all_gathers']} all-gather "
            f"(all ranks {c['total_num_all_reduces']} + {c['total_num_all_gathers']})"
        )
        lines.append(
            f"{r['layout']:<12} {r['decode_step_s'] * 1e3:>10.2f} "
            f"{r['prefill_s'] * 1e3:>11.1f}  {coll}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["available"]]
    names = [r["layout"] for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(
        axes,
        ("decode_step_s", "prefill_s"),
        ("decode step (ms)", "prefill (ms)"),
        strict=True,
    ):
        ax.bar(names, [r[key] * 1e3 for r in ok])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--preset", default="small")
    p.add_argument("--arch", default="llama")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--prefill-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--layouts",
        default=",".join(lay.name for lay in LAYOUTS),
        help="comma-separated subset of " + ", ".join(lay.name for lay in LAYOUTS),
    )
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "steps", "prefill_reps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    names = {lay.name for lay in LAYOUTS}
    unknown = set(args.layouts.split(",")) - names
    if unknown:
        p.error(f"--layouts: unknown {sorted(unknown)}; choose from {sorted(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = model_dir(args.arch, args.preset)
    max_pos = ModelConfig.from_pretrained(path).max_position_embeddings
    # A prompt must leave room in the context (tiny's is 512 positions).
    args.prompt_len = min(args.prompt_len, max_pos - 1)
    chosen = args.layouts.split(",")
    layouts = [
        lay for lay in LAYOUTS if lay.name in chosen and (lay.ep == 1 or args.arch == "qwen3_moe")
    ]
    title = (
        f"{args.arch}/{args.preset}: batch {args.batch} decode, "
        f"{args.prompt_len}-token prefill, fp32, {args.threads} thread(s)/rank"
    )
    temp_dir = None
    if any(lay.world_size > 1 for lay in layouts):
        import ray

        temp_dir = tempfile.mkdtemp(prefix="pdray-")  # short: Ray's socket paths
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        rows = [run_layout(path, lay, args) for lay in tqdm(layouts, desc="layouts")]
    finally:
        if temp_dir is not None:
            ray.shutdown()
    print(report(rows, title))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        "layouts"
        if args.preset == "small" and args.arch == "llama"
        else (f"layouts-{args.arch}-{args.preset}")
    )
    (args.out / f"{stem}.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    plot(rows, title, args.out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
