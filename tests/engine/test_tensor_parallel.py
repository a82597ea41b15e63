"""Tensor parallelism on Ray workers (gloo on CPU) against the single-process engine.

Greedy tokens must be identical and logprobs (logits less a per-row constant) within
fp32 tolerance; each forward must cost exactly 2 all-reduces per layer, 1 for the
vocab-parallel embedding and 1 all-gather of the logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig, ParallelConfig
from engine.executor import RayExecutor
from engine.layout import kv_bytes_per_token
from engine.make_model import make_model
from engine.model_config import ModelConfig
from engine.model_runner import SeqStep
from engine.sampling_params import SamplingParams
from tests.engine.outputs import assert_same_outputs

PROMPTS = ["Hello there, how are you", "The quick brown fox jumps", "zebra"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)


def engine_config(path: Path, **kw: Any) -> EngineConfig:
    kw.setdefault("cache", CacheConfig(num_blocks=32, block_size=16))
    return EngineConfig(model=str(path), dtype="float32", num_threads=1, **kw)


def ray_llm(path: Path, tp: int = 2, **kw: Any) -> LLM:
    config = engine_config(path, **kw)
    return LLM(config, RayExecutor(config, tp=tp, num_cpus_per_worker=0.5))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    return {
        "llama": tiny_llama,
        "qwen3": make_model("qwen3", "tiny", root / "qwen3", seed=1),
        "qwen3_moe": make_model("qwen3_moe", "tiny", root / "qwen3_moe", seed=2),
        # One KV head: TP=2 must replicate it on both ranks.
        "llama_kv1": make_model(
            "llama", "tiny", root / "llama_kv1", seed=3, config_overrides={"num_key_value_heads": 1}
        ),
    }


@pytest.fixture(scope="module")
def llama_tp2(checkpoints: dict[str, Path], ray_cluster: None) -> Iterator[LLM]:
    llm = ray_llm(checkpoints["llama"])
    yield llm
    llm.shutdown()


def test_llama_tp2_matches_tp1(checkpoints: dict[str, Path], llama_tp2: LLM) -> None:
    ref = LLM(engine_config(checkpoints["llama"])).generate(PROMPTS, PARAMS)
    assert_same_outputs(llama_tp2.generate(PROMPTS, PARAMS), ref)
    llama_tp2.block_manager.check_invariants([])


@pytest.mark.parametrize("name", ["qwen3", "llama_kv1", "qwen3_moe"])
def test_tp2_matches_tp1(checkpoints: dict[str, Path], ray_cluster: None, name: str) -> None:
    path = checkpoints[name]
    ref = LLM(engine_config(path)).generate(PROMPTS, PARAMS)
    # qwen3 also covers a pool sized from a byte budget: each rank sizes its own and
    # all must agree (on the minimum) since the driver hands out one block id space.
    cache = CacheConfig(kv_cache_bytes=1 << 20, block_size=16) if name == "qwen3" else None
    llm = ray_llm(path, **({"cache": cache} if cache else {}))
    try:
        assert_same_outputs(llm.generate(PROMPTS, PARAMS), ref)
        if cache is not None:
            executor = llm.executor
            assert isinstance(executor, RayExecutor)
            per_block = 16 * kv_bytes_per_token(ModelConfig.from_pretrained(path), "float32", 2)
            assert executor.info.num_blocks == (1 << 20) // per_block
            assert {s["num_blocks"] for s in executor.stats()} == {executor.info.num_blocks}
    finally:
        llm.shutdown()


def test_collectives_per_step(checkpoints: dict[str, Path], llama_tp2: LLM) -> None:
    executor = llama_tp2.executor
    assert isinstance(executor, RayExecutor)
    layers = ModelConfig.from_pretrained(checkpoints["llama"]).num_layers
    greedy = SamplingParams(temperature=0.0)
    prefill = SeqStep("c", [5, 6, 7, 8], 0, [0], True, greedy)
    executor.execute([prefill])
    before = executor.stats()
    # One decode step of two sequences: still one forward, so one set of collectives.
    executor.execute(
        [SeqStep("c", [9], 4, [0], True, greedy), SeqStep("d", [3], 0, [1], True, greedy)]
    )
    after = executor.stats()
    executor.free(["c", "d"])
    for b, a in zip(before, after, strict=True):
        assert a["num_steps"] - b["num_steps"] == 1
        assert a["num_all_reduces"] - b["num_all_reduces"] == 2 * layers + 1
        assert a["num_all_gathers"] - b["num_all_gathers"] == 1
        assert a["num_threads"] == 1


def test_finished_requests_are_freed_with_the_next_step(llama_tp2: LLM) -> None:
    executor = llama_tp2.executor
    assert isinstance(executor, RayExecutor)
    greedy = SamplingParams(temperature=0.0)

    def held() -> list[int]:
        return [s["num_requests"] for s in executor.stats()]

    executor.execute([SeqStep("f", [5, 6], 0, [2], True, greedy)])  # frees earlier tests'
    assert held() == [1, 1]
    executor.free(["f"])
    assert held() == [1, 1]  # no call of its own: the controller's loop never waits on it
    executor.execute([SeqStep("g", [7], 0, [3], True, greedy)])
    assert held() == [1, 1]  # "f" forgotten first, then "g" taken on
    executor.free(["g"])


def test_bad_tp_is_refused_before_any_actor(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_ray(address: str | None) -> bool:
        raise AssertionError("Ray was contacted for a layout the model cannot take")

    monkeypatch.setattr("engine.executor.connect_ray", no_ray)
    config = engine_config(checkpoints["llama"])
    with pytest.raises(ValueError, match=r"tp=3 does not divide num_attention_heads=4"):
        RayExecutor(config, tp=3)
    with pytest.raises(ValueError, match=r"tp=3"):
        LLM(engine_config(checkpoints["llama"], parallel=ParallelConfig(tp=3)))
    with pytest.raises(ValueError, match=r"tp must be >= 1, got 0"):
        RayExecutor(config, tp=0)
    with pytest.raises(ValueError, match=r"pp=5 is not between 1 and num_hidden_layers=4"):
        RayExecutor(config, tp=1, pp=5)


@pytest.mark.parametrize(
    "layout", [["--tp", "2"], ["--pp", "2", "--pp-boundaries", "3"]], ids=["tp2", "pp2"]
)
def test_cli_generate_on_ray_prints_the_same(
    checkpoints: dict[str, Path],
    ray_cluster: None,
    capsys: pytest.CaptureFixture[str],
    layout: list[str],
) -> None:
    from router.cli import main

    argv = ["generate", "--model", str(checkpoints["llama"]), "--prompt", PROMPTS[0]]
    argv += ["--max-tokens", "6", "--dtype", "float32", "--threads", "1", "--json"]
    argv += ["--kv-cache-bytes", str(1 << 20)]  # a small pool: allocating GBs takes seconds
    assert main(argv) == 0
    single = capsys.readouterr().out
    assert main([*argv, *layout]) == 0
    assert capsys.readouterr().out == single
