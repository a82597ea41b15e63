"""Invariant 2: our engine matches transformers on the same checkpoint, every family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, SeqStep
from engine.sampling_params import SamplingParams
from tests.engine.hf_models import FAMILIES, build_hf_model, hf_greedy

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 7],
    list(range(30, 70)),
    [11] * 3 + [200, 201, 202, 203],
    [300, 1, 2],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp(request.param)
    model = build_hf_model(request.param, path)
    return request.param, path, model


def make_llm(path: Path, **sched: Any) -> LLM:
    return LLM(
        EngineConfig(
            model=str(path),
            dtype="float32",
            num_threads=2,
            cache=CacheConfig(num_blocks=96, block_size=16),
            scheduler=SchedulerConfig(**sched),
        )
    )


def test_logits_match(family: Any) -> None:
    _, path, hf = family
    cfg = EngineConfig(model=str(path), dtype="float32", cache=CacheConfig(num_blocks=32))
    runner = ModelRunner(cfg, ModelConfig.from_pretrained(path))
    steps, start = [], 0
    for i, p in enumerate(PROMPTS):
        n_blocks = -(-len(p) // 16)
        table = list(range(start, start + n_blocks))
        start += n_blocks
        steps.append(SeqStep(f"r{i}", p, 0, table, True, GREEDY))
    batch = runner.build_batch(steps)
    batch.logits_indices = torch.arange(batch.num_tokens)
    ours = runner.model(batch, runner.kv_caches)
    offset = 0
    for p in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(ours[offset : offset + len(p)], ref, atol=2e-4, rtol=1e-4)
        offset += len(p)


def test_greedy_tokens_match(family: Any) -> None:
    _, path, hf = family
    outs = make_llm(path).generate(PROMPTS, GREEDY)
    for p, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, p, 32)
        assert out.finish_reason == "length"


def test_prefix_cache_hits_keep_tokens(family: Any) -> None:
    _, path, hf = family
    llm = make_llm(path)
    shared = list(range(100, 140))  # 2.5 blocks of 16
    first = llm.generate([[*shared, 1, 2]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    prompts = [[*shared, 7, 8, 9], [*shared[:32], 3]]
    outs = llm.generate(prompts, GREEDY)
    assert [o.num_cached_tokens for o in outs] == [32, 32]
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, p, 32)
    llm.block_manager.check_invariants([])


def test_chunked_prefill_keeps_tokens(family: Any) -> None:
    _, path, hf = family
    llm = make_llm(path, max_num_batched_tokens=8, chunked_prefill=True)
    outs = llm.generate(PROMPTS[:2], GREEDY)
    for p, out in zip(PROMPTS[:2], outs, strict=True):
        assert out.token_ids == hf_greedy(hf, p, 32)
