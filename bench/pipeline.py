"""Pipeline stage utilisation: measured busy/wall per stage next to the ideal m/(m+s-1).

Run: ``python -m bench.pipeline [--preset tiny|small] [--pp 2] [--batch 8] [--steps 32]``.
For each micro-batch count m (``--microbatches 1,2``) it starts an instance of pp stages
on a local Ray cluster, prefills ``--batch`` sequences, then times ``--steps`` decode
steps of the whole batch and prints each stage's utilisation over those steps.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from engine.config import CacheConfig, EngineConfig, ParallelConfig
from engine.executor import RayExecutor
from engine.make_model import make_model
from engine.model_runner import SeqStep
from engine.sampling_params import SamplingParams

PROMPT_LEN = 16
BLOCK = 16


def measure(model: Path, pp: int, m: int, batch: int, steps: int) -> list[dict[str, float]]:
    """Stage utilisation over ``steps`` decode steps of ``batch`` sequences."""
    config = EngineConfig(
        model=str(model),
        dtype="float32",
        num_threads=1,
        cache=CacheConfig(num_blocks=batch * 4, block_size=BLOCK),
        parallel=ParallelConfig(pp=pp, pp_microbatches=m),
    )
    greedy = SamplingParams(temperature=0.0)
    with RayExecutor(config, num_cpus_per_worker=0.5) as ex:
        tables = {i: [i * 4 + j for j in range(4)] for i in range(batch)}
        prompts = [
            SeqStep(str(i), [1 + i] * PROMPT_LEN, 0, tables[i], True, greedy) for i in range(batch)
        ]
        last = ex.execute(prompts).token_ids
        before = ex.stats()
        for t in range(steps):
            pos = PROMPT_LEN + t
            step = [SeqStep(str(i), [last[i]], pos, tables[i], True, greedy) for i in range(batch)]
            last = ex.execute(step).token_ids
        return ex.stage_utilisation(since=before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=("tiny", "small", "medium"))
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--microbatches", default="1,2")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model("llama", args.preset, Path(tmp) / "model", dtype="float32")
        for m in (int(x) for x in args.microbatches.split(",")):
            util = measure(model, args.pp, m, args.batch, args.steps)
            cells = "  ".join(f"stage {u['stage']}: {u['utilisation']:.2f}" for u in util)
            wall_ms = 1000 * util[-1]["wall_s"] / args.steps
            print(
                f"{args.preset} pp={args.pp} m={m} batch={args.batch}: {cells}  "
                f"(ideal {util[0]['ideal']:.2f}; {wall_ms:.1f} ms/step)"
            )


if __name__ == "__main__":
    main()
