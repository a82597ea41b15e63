"""Pipeline parallelism: a worker's stage, micro-batches, and the step loop of a stage.

Ranks are laid out stage-major (rank = stage * width + r, width = max(tp, ep) ranks per
stage: ep/tp consecutive TP groups when ep > tp, which then share one MoE group); hidden
states go point-to-point from (stage s, r) to (stage s + 1, r). A step is cut into
micro-batches that every rank derives the same way (``split_microbatches``), so a
stage knows each message's shape in advance and stage s works on micro-batch i + 1
while stage s + 1 works on micro-batch i.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.model_runner import ModelRunner, SeqStep
from engine.sampler import SamplerOutput
from engine.stages import stage_layers


@dataclass(frozen=True)
class Stage:
    """This rank's place in the pipeline: stage ``pp_rank`` of ``pp_size``, rank
    ``tp_rank`` of the stage's ``tp_size`` ranks (the TP size, or ep when ep > tp: then
    the rank is ``tp_rank % tp`` in its TP group); ``boundaries`` split the layers into stages
    (None: balanced; ``engine.stages.stage_layers``)."""

    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int
    boundaries: tuple[int, ...] | None = None

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_rank(self) -> int:
        """Global rank this one receives hidden states from (same TP rank, stage - 1)."""
        return (self.pp_rank - 1) * self.tp_size + self.tp_rank

    @property
    def next_rank(self) -> int:
        """Global rank this one sends hidden states to (same TP rank, stage + 1)."""
        return (self.pp_rank + 1) * self.tp_size + self.tp_rank

    def layers(self, num_layers: int) -> range:
        return stage_layers(num_layers, self.pp_size, self.boundaries)[self.pp_rank]


def stage_of(rank: int, tp: int, pp: int, boundaries: tuple[int, ...] | None = None) -> Stage:
    """The stage of global ``rank`` in a (tp, pp) layout whose stages split the layers
    at ``boundaries`` (None: balanced); ValueError outside it."""
    if not 0 <= rank < tp * pp:
        raise ValueError(f"rank {rank} is outside a layout of tp={tp} x pp={pp}")
    return Stage(rank // tp, pp, rank % tp, tp, boundaries)


def tp_group_ranks(tp: int, pp: int, width: int | None = None) -> list[list[int]]:
    """Global ranks of every TP group, stage by stage, in the order every rank must
    create them (``dist.new_group`` is collective over the whole world). A stage of
    ``width`` ranks (default: tp) holds width/tp consecutive TP groups."""
    width = tp if width is None else width
    return [
        list(range(s * width + g * tp, s * width + (g + 1) * tp))
        for s in range(pp)
        for g in range(width // tp)
    ]


def split_microbatches(steps: list[SeqStep], m: int) -> list[list[SeqStep]]:
    """``steps`` cut into at most ``m`` contiguous, non-empty micro-batches of nearly
    equal size. Contiguous pieces of a prefill-first list stay prefill-first, and their
    samples concatenated are in the original order. ValueError if m < 1."""
    if m < 1:
        raise ValueError(f"number of micro-batches must be >= 1, got {m}")
    m = min(m, len(steps)) or 1
    base, extra = divmod(len(steps), m)
    out, start = [], 0
    for i in range(m):
        n = base + (1 if i < extra else 0)
        out.append(steps[start : start + n])
        start += n
    return [mb for mb in out if mb] or [[]]


@dataclass
class StageTimer:
    """Busy (forward compute) and wall seconds of a stage's ``execute`` calls."""

    busy_s: float = 0.0
    wall_s: float = 0.0
    num_steps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"busy_s": self.busy_s, "wall_s": self.wall_s, "pp_steps": self.num_steps}


def run_stage(
    runner: ModelRunner, stage: Stage, microbatches: list[list[SeqStep]], timer: StageTimer
) -> SamplerOutput | None:
    """Runs this stage's layers over every micro-batch in order. The first stage embeds,
    the others block in ``dist.recv`` for the previous stage's hidden state and residual
    (one [2, tokens, hidden] tensor; waits up to the group's timeout); all but the last
    send theirs on with ``isend`` so they move on without waiting for the receiver. The
    last stage's TP rank 0 samples the whole step; every other rank returns None."""
    t0 = time.perf_counter()
    busy = 0.0
    pending: list[Any] = []
    logits: list[torch.Tensor] = []
    model = runner.model
    hidden_size = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        for mb in microbatches:
            batch = runner.build_batch(mb)
            if stage.is_first:
                start = time.perf_counter()
                x, residual = model.model.embed(batch.input_ids), None
            else:
                buf = torch.empty(2, batch.num_tokens, hidden_size, dtype=dtype)
                dist.recv(buf, src=stage.prev_rank)
                start = time.perf_counter()
                x, residual = buf[0], buf[1]
            with runner.gemv.step(batch.num_tokens):
                x, residual = model.model.run_layers(batch, x, residual, runner.kv_caches)
                if stage.is_last:
                    logits.append(model.logits(model.model.final_norm(x, residual), batch))
            if not stage.is_last:
                if residual is None:  # every stage has >= 1 layer, so never: for mypy
                    raise RuntimeError("a pipeline stage ran no layer")
                out = torch.stack((x, residual))
                pending.append((dist.isend(out, dst=stage.next_rank), out))
            busy += time.perf_counter() - start
        start = time.perf_counter()
        result = _sample(runner, stage, microbatches, logits)
        busy += time.perf_counter() - start
    for work, _ in pending:  # keep each sent tensor alive until its send completed
        work.wait()
    timer.busy_s += busy
    timer.wall_s += time.perf_counter() - t0
    timer.num_steps += 1
    return result


def _sample(
    runner: ModelRunner,
    stage: Stage,
    microbatches: list[list[SeqStep]],
    logits: list[torch.Tensor],
) -> SamplerOutput | None:
    if not (stage.is_last and stage.tp_rank == 0):
        return None
    steps = [s for mb in microbatches for s in mb]
    return runner.sample(steps, torch.cat(logits))
