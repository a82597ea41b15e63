"""Expert parallelism (engine/expert_parallel.py) against plain TP / one process.

In-process tests sum the ranks' partial MoE outputs by hand (what the all-reduce does);
the gloo test runs a tiny Qwen3-MoE over two spawned processes (tp=2, ep=2) and
compares its logits with the single-process model's.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import CacheConfig, EngineConfig, ParallelConfig
from engine.expert_parallel import ExpertLoad, expert_load, expert_range, validate_ep
from engine.make_model import make_model
from engine.model_config import ModelConfig, RopeConfig
from engine.model_runner import ModelRunner, SeqStep
from engine.moe import SparseMoeBlock
from engine.parallel import ParallelContext
from engine.sampling_params import SamplingParams

E, TOP_K, H, INTER = 8, 2, 16, 8
ATOL = 1e-5


class PartialContext(ParallelContext):
    """A rank whose all-reduce is left to the test (it sums the ranks' outputs)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def moe_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def moe_config() -> ModelConfig:
    return ModelConfig(
        model_type="qwen3_moe",
        vocab_size=64,
        hidden_size=H,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        rope=RopeConfig(),
        tie_word_embeddings=False,
        attention_bias=False,
        qk_norm=True,
        torch_dtype="float32",
        num_experts=E,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=INTER,
    )


def hf_weights(seed: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """Per-expert HF-shaped tensors keyed by (expert, which): 0 gate, 1 up, 2 down."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        for which in range(3):
            shape = (H, INTER) if which == 2 else (INTER, H)
            out[(e, which)] = torch.randn(shape, generator=g) * 0.3
    return out


def make_block(pc: ParallelContext, gate: torch.Tensor, seed: int = 0) -> SparseMoeBlock:
    block = SparseMoeBlock(moe_config(), torch.float32, pc)
    block.gate.weight.data.copy_(gate)
    for (e, which), w in hf_weights(seed).items():
        block.experts.load("w2" if which == 2 else "w13", w, (e, which))
    return block


@pytest.mark.parametrize(("tp", "ep"), [(2, 2), (4, 2), (4, 4), (2, 1)])
def test_ranks_sum_to_the_unsharded_block(tp: int, ep: int) -> None:
    g = torch.Generator().manual_seed(1)
    gate, x = torch.randn(E, H, generator=g), torch.randn(11, H, generator=g)
    ref_block = make_block(ParallelContext(), gate)
    ref = ref_block(x.clone())
    ranks = [make_block(PartialContext(r, tp, ep_size=ep), gate) for r in range(tp)]
    out = sum(b(x.clone()) for b in ranks)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    for r, b in enumerate(ranks):
        # Each rank holds only its group's experts, at its share of the width.
        assert b.experts.w13.shape == (E // ep, 2 * INTER * ep // tp, H)
        assert list(b.experts.expert_ids) == list(expert_range(E, ep, r // (tp // ep)))
        assert torch.equal(b.expert_tokens, ref_block.expert_tokens)
    assert int(ref_block.expert_tokens.sum()) == 11 * TOP_K


@pytest.mark.parametrize(("tp", "ep"), [(1, 2), (1, 4), (2, 4)])
def test_moe_group_wider_than_tp_sums_to_the_unsharded_block(tp: int, ep: int) -> None:
    """ep > tp: the MoE group is a stage's ep ranks; each holds E/ep whole experts and
    the ranks' partial outputs (summed by the MoE group's all-reduce) give the block."""
    g = torch.Generator().manual_seed(2)
    gate, x = torch.randn(E, H, generator=g), torch.randn(9, H, generator=g)
    ref = make_block(ParallelContext(), gate)(x.clone())
    pcs = [PartialContext(r % tp, tp, ep_size=ep, moe_size=ep, moe_rank=r) for r in range(ep)]
    ranks = [make_block(pc, gate) for pc in pcs]
    out = sum(b(x.clone()) for b in ranks)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    for r, b in enumerate(ranks):
        assert b.experts.w13.shape == (E // ep, 2 * INTER, H)
        assert list(b.experts.expert_ids) == list(expert_range(E, ep, r))


def test_expert_range_and_context() -> None:
    assert list(expert_range(8, 2, 1)) == [4, 5, 6, 7]
    pc = ParallelContext(3, 4, ep_size=2)
    assert (pc.ep_rank, pc.expert_tp_size, pc.expert_tp_rank) == (1, 2, 1)
    with pytest.raises(ValueError, match="ep_size=3 must divide tp_size=4"):
        ParallelContext(0, 4, ep_size=3)
    # ep > tp: a separate MoE group of ep ranks, tp/ep replicas of the TP group.
    pc = ParallelContext(0, 1, ep_size=2, moe_size=2, moe_rank=1)
    assert (pc.ep_rank, pc.expert_tp_size, pc.expert_tp_rank) == (1, 1, 0)
    pc = ParallelContext(1, 2, ep_size=4, moe_size=4, moe_rank=3)
    assert (pc.ep_rank, pc.expert_tp_size, pc.expert_tp_rank) == (3, 1, 0)
    with pytest.raises(ValueError, match="ep_size=4 must divide moe_size=2"):
        ParallelContext(0, 1, ep_size=4, moe_size=2)
    with pytest.raises(ValueError, match="moe_size=3 must be a multiple of tp_size=2"):
        ParallelContext(0, 2, ep_size=3, moe_size=3)
    with pytest.raises(ValueError, match="ep_rank=2 is outside ep_size=2"):
        expert_range(8, 2, 2)


def test_bad_ep_is_refused() -> None:
    cfg = moe_config()
    with pytest.raises(ValueError, match="ep=3 and tp=2: one must divide the other"):
        ParallelConfig(tp=2, ep=3)
    with pytest.raises(ValueError, match="ep=3 must divide tp=2 .* or be a multiple of it"):
        validate_ep(cfg, 2, 3)
    assert ParallelConfig(tp=1, ep=2, pp=2).world_size == 4  # ep > tp: ep ranks per stage
    ParallelConfig(tp=1, ep=2).check_model(cfg)
    ParallelConfig(tp=2, ep=4).check_model(cfg)
    with pytest.raises(ValueError, match="ep=3 does not divide num_experts=8"):
        validate_ep(cfg, 3, 3)
    with pytest.raises(ValueError, match="ep=2 needs a mixture-of-experts model"):
        ParallelConfig(tp=2, ep=2).check_model(replace(cfg, num_experts=0))
    ParallelConfig(tp=2, ep=2).check_model(cfg)


def test_hotspot_ratio_on_crafted_routing() -> None:
    # Gate rows 0 and 1 dominate for positive inputs: every token picks experts 0 and 1.
    gate = torch.zeros(E, H)
    gate[0], gate[1] = 2.0, 1.0
    block = make_block(ParallelContext(), gate)
    block(torch.rand(10, H) + 0.1)
    load = expert_load(block, ep_size=2)
    assert load.tokens_per_expert == [10, 10] + [0] * (E - 2)
    assert load.hotspot_ratio == pytest.approx(E / 2)
    assert load.tokens_per_rank == [20, 0]
    assert load.rank_hotspot_ratio == pytest.approx(2.0)
    assert ExpertLoad([3] * E).hotspot_ratio == 1.0
    assert ExpertLoad([0] * E).hotspot_ratio == 0.0
    with pytest.raises(ValueError, match="no MoE blocks"):
        expert_load(torch.nn.Linear(2, 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STEPS = [
    SeqStep("a", [5, 6, 7, 8, 9, 10], 0, [0], True, SamplingParams(temperature=0.0)),
    SeqStep("b", [3, 1, 4], 0, [1], True, SamplingParams(temperature=0.0)),
]


def engine_config(path: Path, tp: int = 1, ep: int = 1, pp: int = 1) -> EngineConfig:
    return EngineConfig(
        model=str(path),
        dtype="float32",
        num_threads=1,
        cache=CacheConfig(num_blocks=4, block_size=16),
        parallel=ParallelConfig(tp=tp, ep=ep, pp=pp),
    )


def _rank_main(rank: int, path: str, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    pc = ParallelContext(rank, 2, dist.group.WORLD, ep_size=2)
    runner = ModelRunner(engine_config(Path(path), 2, 2), ModelConfig.from_pretrained(path), pc)
    logits = runner.model(runner.build_batch(STEPS), runner.kv_caches)
    if rank == 0:
        load = expert_load(runner.model, ep_size=2)
        torch.save({"logits": logits, "reduces": pc.num_all_reduces, "load": load}, out)
    dist.destroy_process_group()


def test_gloo_tp2_ep2_matches_one_process(tmp_path: Path) -> None:
    path = make_model("qwen3_moe", "tiny", tmp_path / "moe", seed=2)
    runner = ModelRunner(engine_config(path), ModelConfig.from_pretrained(path))
    ref = runner.model(runner.build_batch(STEPS), runner.kv_caches)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(str(path), free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    torch.testing.assert_close(got["logits"], ref, atol=1e-4, rtol=0)
    layers = ModelConfig.from_pretrained(path).num_layers
    assert got["reduces"] == 2 * layers + 1  # EP adds no collective to TP's
    assert got["load"] == expert_load(runner.model, ep_size=2)


@pytest.mark.parametrize(("tp", "ep", "pp"), [(2, 2, 1), (1, 2, 1), (1, 2, 2)])
def test_ray_ep_generates_like_tp1(
    tmp_path: Path, ray_cluster: None, tp: int, ep: int, pp: int
) -> None:
    """TP=2 x EP=2 (experts split within the TP group), TP=1 x EP=2 (two replicas of
    attention, experts over both ranks) and that in 2 pipeline stages give the
    one-process tokens and logprobs; the collectives per step are TP's plus one
    all-reduce per MoE layer, and the per-expert load the ranks report (global over
    their stage's layers) adds up to the one-process model's."""
    from decode.llm import LLM
    from engine.executor import RayExecutor

    path = make_model("qwen3_moe", "tiny", tmp_path / "moe", seed=2)
    cfg = ModelConfig.from_pretrained(path)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompts = ["Hello there, how are you", "zebra"]
    ref_llm = LLM(engine_config(path))
    ref = ref_llm.generate(prompts, params)
    config = engine_config(path, tp, ep, pp)
    llm = LLM(config, RayExecutor(config, num_cpus_per_worker=0.5))
    try:
        for o, r in zip(llm.generate(prompts, params), ref, strict=True):
            assert o.token_ids == r.token_ids
            for lo, lr in zip(o.logprobs, r.logprobs, strict=True):
                assert lo.logprob == pytest.approx(lr.logprob, abs=1e-4)
        executor = llm.executor
        assert isinstance(executor, RayExecutor)
        _check_ep_stats(executor.stats(), cfg, tp, ep, pp, ref_llm)
    finally:
        llm.shutdown()


def _check_ep_stats(
    stats: list[dict[str, Any]], cfg: ModelConfig, tp: int, ep: int, pp: int, ref_llm: Any
) -> None:
    width = max(tp, ep)
    assert len(stats) == width * pp
    assert isinstance(ref_llm.executor, ModelRunner)
    ref = expert_load(ref_llm.executor.model).tokens_per_expert
    total = [0] * cfg.num_experts
    for rank, s in enumerate(stats):
        local = rank % width
        assert (s["ep_size"], s["ep_rank"]) == (ep, local * ep // width)
        assert s["experts"] == list(expert_range(cfg.num_experts, ep, s["ep_rank"]))
        moe_layers = sum(cfg.is_moe_layer(i) for i in s["layers"])
        if pp == 1:  # one forward per step (no micro-batches)
            tp_reduces = 2 * cfg.num_layers - moe_layers + 1 if tp > 1 else 0  # + embedding
            assert s["num_all_reduces"] == s["num_steps"] * (tp_reduces + moe_layers)
            assert s["num_all_gathers"] == (s["num_steps"] if tp > 1 else 0)
        elif tp == 1:  # only the MoE combines, one per MoE layer per micro-batch
            assert s["num_all_reduces"] % moe_layers == 0 < s["num_all_reduces"]
            assert s["num_all_gathers"] == 0
        if local == 0:
            total = [a + b for a, b in zip(total, s["tokens_per_expert"], strict=True)]
    assert total == ref
    assert sum(ref) > 0
