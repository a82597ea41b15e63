"""The Triton kernels inside the whole engine give the torch path's tokens, both on
CUDA when there is one (on CPU they run under TRITON_INTERPRET=1, set by
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.sampling_params import SamplingParams

PROMPTS = [list(range(5, 40)), [30, 31, 32], [*range(5, 37), 99]]


def run(path: Path, backend: str) -> tuple[list[list[int]], list[int]]:
    llm = LLM(
        EngineConfig(
            model=str(path),
            dtype="float32",
            device="cuda" if torch.cuda.is_available() else "cpu",
            attention_backend=backend,
            cache=CacheConfig(num_blocks=24, block_size=16),
            scheduler=SchedulerConfig(max_num_batched_tokens=12),  # chunked prefill
        )
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    first = llm.generate(PROMPTS[:2], greedy)
    # The third prompt shares two full blocks with the first: a prefix-cache hit.
    third = llm.generate(PROMPTS[2:], greedy)[0]
    llm.block_manager.check_invariants([])
    return [o.token_ids for o in [*first, third]], [third.num_cached_tokens]


def test_triton_backend_matches_torch(tiny_llama: Path) -> None:
    torch_tokens, torch_cached = run(tiny_llama, "torch")
    triton_tokens, triton_cached = run(tiny_llama, "triton")
    assert triton_tokens == torch_tokens
    assert triton_cached == torch_cached == [32]
