"""Pipeline parallelism (and TP x PP) on Ray workers against the single-process engine.

Greedy tokens must be identical and logprobs within fp32 tolerance; each stage holds
only its layers' weights and KV; micro-batching must not change the tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.executor import RayExecutor
from engine.layout import kv_bytes_per_token, stage_layers
from engine.make_model import make_model
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, SeqStep
from engine.pipeline import split_microbatches, stage_of
from engine.sampling_params import SamplingParams
from tests.engine.outputs import assert_same_outputs

# Different lengths; the fourth shares the first's prefix (prefix-cache hits).
PROMPTS = [
    "Hello there, how are you doing on this fine day",
    "The quick brown fox jumps",
    "zebra",
    "Hello there, how are you doing on this fine evening",
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)
GREEDY = SamplingParams(temperature=0.0)


def engine_config(path: Path, **kw: Any) -> EngineConfig:
    kw.setdefault("cache", CacheConfig(num_blocks=64, block_size=4))
    return EngineConfig(model=str(path), dtype="float32", num_threads=1, **kw)


def ray_llm(path: Path, tp: int, pp: int, **kw: Any) -> LLM:
    config = engine_config(path, **kw)
    return LLM(config, RayExecutor(config, tp=tp, pp=pp, num_cpus_per_worker=0.5))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pp-models")
    # llama has an untied LM head, qwen3 a tied one (the last stage loads the embedding).
    return {"llama": tiny_llama, "qwen3": make_model("qwen3", "tiny", root / "qwen3", seed=1)}


def test_split_microbatches_keeps_order() -> None:
    steps = [SeqStep(str(i), [1, 2] if i < 2 else [3], 0, [0], True, GREEDY) for i in range(5)]
    mbs = split_microbatches(steps, 2)
    assert [len(mb) for mb in mbs] == [3, 2]
    assert [s for mb in mbs for s in mb] == steps
    assert split_microbatches(steps[:1], 4) == [steps[:1]]
    with pytest.raises(ValueError, match="got 0"):
        split_microbatches(steps, 0)
    with pytest.raises(ValueError, match="pp_microbatches must be >= 1, got 0"):
        ParallelConfig(pp=2, pp_microbatches=0)
    assert ParallelConfig(pp=3).microbatches == 3
    assert [stage_of(r, 2, 2).pp_rank for r in range(4)] == [0, 0, 1, 1]
    assert stage_of(3, 2, 2).prev_rank == 1


def test_stages_chained_in_process_match_full_model(checkpoints: dict[str, Path]) -> None:
    """Stage 0's hidden state and residual fed into stage 1 give the full model's logits;
    each stage holds only its layers' parameters and KV."""
    for path in checkpoints.values():
        cfg = ModelConfig.from_pretrained(path)
        config = engine_config(path)
        full = ModelRunner(config, cfg)
        first, last = (ModelRunner(config, cfg, layers=r) for r in stage_layers(4, 2))
        assert not any(".layers.2." in n for n, _ in first.model.named_parameters())
        assert not any(".layers.1." in n for n, _ in last.model.named_parameters())
        assert len(first.kv_caches) == len(last.kv_caches) == 2
        steps = [SeqStep("a", list(range(5, 14)), 0, [0, 1, 2], True, GREEDY)]
        batch = full.build_batch(steps)
        ref = full.model(batch, full.kv_caches)
        with torch.inference_mode():
            x = first.model.model.embed(batch.input_ids)
            x, res = first.model.model.run_layers(batch, x, None, first.kv_caches)
            x, res = last.model.model.run_layers(batch, x, res, last.kv_caches)
            logits = last.model.logits(last.model.model.final_norm(x, res), batch)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_loader_skips_other_stages_but_checks_its_own(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    src = checkpoints["llama"]
    tensors = load_file(str(src / "model.safetensors"))
    broken = tmp_path / "no-layer0"
    broken.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.0.")}
    save_file(kept, str(broken / "model.safetensors"))
    cfg = ModelConfig.from_pretrained(broken)
    config = engine_config(broken)
    ModelRunner(config, cfg, layers=range(2, 4))  # stage 1 never needed layer 0
    with pytest.raises(ValueError, match=r"model\.layers\.0\."):
        ModelRunner(config, cfg, layers=range(0, 2))


def _check_stage_stats(
    executor: RayExecutor, path: Path, tp: int, m: int, bounds: tuple[int, ...] | None = None
) -> None:
    cfg = ModelConfig.from_pretrained(path)
    stats = executor.stats()
    assert len(stats) == tp * 2
    for s in stats:
        layers = stage_layers(cfg.num_layers, 2, bounds)[s["pp_rank"]]
        assert s["layers"] == list(layers)
        assert s["kv_layers"] == len(layers)
        assert s["kv_block_bytes"] == 4 * kv_bytes_per_token(cfg, "float32", tp, len(layers))
        assert s["num_blocks"] == executor.info.num_blocks
    util = executor.stage_utilisation()
    assert [u["stage"] for u in util] == [0, 1]
    # Stage 0's share can exceed its ideal when Ray starts the last stage late; only the
    # last stage's own busy time is bounded by its wall time.
    assert all(u["utilisation"] > 0.0 for u in util)
    assert util[-1]["utilisation"] <= 1.0
    assert util[0]["ideal"] == pytest.approx(m / (m + 1))


@pytest.mark.parametrize(
    ("name", "tp", "m"), [("llama", 1, 2), ("qwen3", 2, 2), ("qwen3", 1, 1), ("llama", 2, 3)]
)
def test_pipeline_matches_single_rank(
    checkpoints: dict[str, Path], ray_cluster: None, name: str, tp: int, m: int
) -> None:
    """PP=2 and TP=2 x PP=2 with m micro-batches, chunked prefill (8-token budget) and
    prefix-cache hits (the prompts run twice) give the single-rank tokens and logprobs
    (so m = 1, 2 and 3 give the same tokens)."""
    path = checkpoints[name]
    sched = SchedulerConfig(max_num_batched_tokens=8)
    ref_llm = LLM(engine_config(path, scheduler=sched))
    ref = ref_llm.generate(PROMPTS, PARAMS)
    parallel = ParallelConfig(pp_microbatches=m)
    llm = ray_llm(path, tp=tp, pp=2, scheduler=sched, parallel=parallel)
    try:
        assert_same_outputs(llm.generate(PROMPTS, PARAMS), ref)
        assert_same_outputs(llm.generate(PROMPTS, PARAMS), ref)  # now from the prefix cache
        assert llm.block_manager.stats().prefix_hit_tokens > 0
        llm.block_manager.check_invariants([])
        executor = llm.executor
        assert isinstance(executor, RayExecutor)
        _check_stage_stats(executor, path, tp, m)
    finally:
        llm.shutdown()


def test_pipeline_explicit_boundaries(checkpoints: dict[str, Path], ray_cluster: None) -> None:
    """PP=2 split at layer 1 (stages of 1 and 3 layers) gives the single-rank tokens,
    and each rank holds the layers of its explicit stage."""
    path = checkpoints["llama"]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=5)
    ref = LLM(engine_config(path)).generate(PROMPTS[:2], params)
    llm = ray_llm(path, tp=1, pp=2, parallel=ParallelConfig(pp=2, pp_boundaries=(1,)))
    try:
        assert_same_outputs(llm.generate(PROMPTS[:2], params), ref)
        executor = llm.executor
        assert isinstance(executor, RayExecutor)
        assert [s["layers"] for s in executor.stats()] == [[0], [1, 2, 3]]
        _check_stage_stats(executor, path, 1, 2, (1,))
    finally:
        llm.shutdown()
