"""Decode steps replayed from CUDA graphs give the eager path's tokens (GPU only), and
the CPU path never builds graphs."""

from __future__ import annotations

from pathlib import Path

import pytest

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.sampling_params import SamplingParams

PROMPTS = [list(range(5, 40)), [30, 31, 32], [*range(5, 37), 99], [7] * 20, [9, 8, 7, 6, 5]]


def generate(path: Path, device: str, graphs: bool) -> tuple[list[list[int]], LLM]:
    llm = LLM(
        EngineConfig(
            model=str(path),
            dtype="float32",
            device=device,
            cuda_graphs=graphs,
            cache=CacheConfig(num_blocks=64, block_size=16),
            scheduler=SchedulerConfig(max_num_seqs=8),
        )
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # Requests finish at once here, so every step decodes all five: batch 5 pads to 8.
    outs = llm.generate(PROMPTS, greedy)
    llm.block_manager.check_invariants([])
    return [o.token_ids for o in outs], llm


def test_cpu_builds_no_graphs(tiny_llama: Path) -> None:
    _, llm = generate(tiny_llama, "cpu", True)
    assert llm.runner.graphs is None


@pytest.mark.gpu
def test_graph_replay_matches_eager(tiny_llama: Path) -> None:
    eager, off = generate(tiny_llama, "cuda", False)
    assert off.runner.graphs is None
    replayed, on = generate(tiny_llama, "cuda", True)
    assert replayed == eager
    graphs = on.runner.graphs
    assert graphs is not None and graphs.replays >= 23 and set(graphs.graphs) == {8}
