"""Layout validation, analytic weight bytes (checked against the real model) and KV sizing."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from engine.attention import get_attention_backend
from engine.config import CacheConfig, ParallelConfig
from engine.layout import (
    dtype_bytes,
    format_bytes,
    kv_bytes_per_token,
    parse_bytes,
    plan_memory,
    stage_layers,
    valid_tp_values,
    validate_layout,
    weight_bytes_per_rank,
)
from engine.make_model import ARCHS, param_count, preset_config
from engine.memory import kv_block_bytes, num_kv_blocks
from engine.model import CausalLM
from engine.model_config import ModelConfig
from engine.parallel import ParallelContext

GiB = 2**30


def _cfg(arch: str = "llama", preset: str = "tiny", **overrides: Any) -> ModelConfig:
    return ModelConfig.from_dict({**preset_config(arch, preset), **overrides})


def _real_bytes(cfg: ModelConfig, dtype: str, tp: int = 1, rank: int = 0) -> int:
    """Bytes of the parameters ``CausalLM`` allocates on TP rank ``rank`` (on the meta
    device: shapes only, no memory, no process group)."""
    backend = get_attention_backend("torch", torch.device("cpu"))
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = CausalLM(cfg, torch_dtype, ParallelContext(tp_rank=rank, tp_size=tp), backend, 64)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _llama70b(**overrides: Any) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            **overrides,
        }
    )


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_weight_bytes_equal_real_parameters_at_tp1(arch: str, preset: str, tied: bool) -> None:
    raw = {**preset_config(arch, preset), "tie_word_embeddings": tied}
    cfg = ModelConfig.from_dict(raw)
    for dtype in ("float32", "bfloat16"):
        expected = param_count(raw) * dtype_bytes(dtype)
        assert weight_bytes_per_rank(cfg, dtype, 1, 1) == expected
        assert _real_bytes(cfg, dtype) == expected


def test_weight_bytes_with_dense_layers_in_moe_model() -> None:
    raw = {**preset_config("qwen3_moe", "tiny"), "mlp_only_layers": [1], "decoder_sparse_step": 2}
    cfg = ModelConfig.from_dict(raw)
    assert weight_bytes_per_rank(cfg, "float32", 1, 1) == param_count(raw) * 4
    assert weight_bytes_per_rank(cfg, "float32", 2, 1) == _real_bytes(cfg, "float32", 2)


# tiny: 4 heads, 2 KV heads, so tp=4 replicates each KV head on two ranks; vocab 509
# does not divide by tp (the last rank's rows are padding the model allocates too).
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("vocab", [512, 509])
def test_weight_bytes_per_rank_equal_real_shards(
    arch: str, tp: int, tied: bool, vocab: int
) -> None:
    cfg = _cfg(arch, tie_word_embeddings=tied, vocab_size=vocab)
    analytic = weight_bytes_per_rank(cfg, "float32", tp, 1)
    for rank in range(tp):
        assert _real_bytes(cfg, "float32", tp, rank) == analytic


def test_weight_bytes_tp2_by_hand() -> None:
    # tiny llama: h=64, 4 layers, 4 heads x 16, 2 KV heads, inter 128, vocab 512, untied.
    cfg = _cfg("llama")
    h, d, inter, vocab = 64, 16, 128, 512
    layer = h * (2 * d + d + d) + h * (2 * d) + 3 * h * (inter // 2) + 2 * h  # q,k,v | o | mlp
    expected = 4 * layer + 2 * (vocab // 2) * h + h
    assert weight_bytes_per_rank(cfg, "float32", 2, 1) == expected * 4


def test_stage_layers_balanced() -> None:
    assert [len(r) for r in stage_layers(10, 4)] == [3, 3, 2, 2]
    assert [list(r) for r in stage_layers(4, 2)] == [[0, 1], [2, 3]]
    assert [len(r) for r in stage_layers(80, 3)] == [27, 27, 26]
    with pytest.raises(ValueError, match="pp=5"):
        stage_layers(4, 5)


def test_stage_layers_explicit_boundaries() -> None:
    assert [list(r) for r in stage_layers(4, 2, (1,))] == [[0], [1, 2, 3]]
    assert [list(r) for r in stage_layers(10, 3, [2, 9])] == [[0, 1], list(range(2, 9)), [9]]
    assert stage_layers(4, 1, ()) == [range(4)]
    cases = [
        ((4, 2, (0,)), r"pp_boundaries=\(0,\) must be >= 1"),
        ((4, 2, (4,)), r"pp_boundaries=\(4,\) must be < num_hidden_layers=4"),
        ((4, 3, (2, 2)), r"pp_boundaries=\(2, 2\) must be strictly increasing"),
        ((4, 3, (1,)), r"pp_boundaries=\(1,\) must hold pp-1=2 layer indices"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            stage_layers(*args)
    with pytest.raises(ValueError, match=r"pp_boundaries=\(3, 1\) must be strictly"):
        ParallelConfig(pp=3, pp_boundaries=(3, 1))
    with pytest.raises(ValueError, match=r"pp_boundaries=\(1,\) must hold pp-1=0"):
        ParallelConfig(pp_boundaries=(1,))
    with pytest.raises(ValueError, match=r"pp_boundaries=\(5,\) must be < num_hidden_layers=4"):
        ParallelConfig(pp=2, pp_boundaries=(5,)).check_model(_cfg("llama"))


def test_boundaries_reach_weights_and_plan() -> None:
    cfg = _cfg("llama", "small")  # 8 layers
    stages = [weight_bytes_per_rank(cfg, "bfloat16", 1, 2, r, boundaries=(2,)) for r in (0, 1)]
    balanced = [weight_bytes_per_rank(cfg, "bfloat16", 1, 2, r) for r in (0, 1)]
    assert stages[0] < balanced[0] and stages[1] > balanced[1]
    assert sum(stages) == sum(balanced)
    plan = plan_memory(cfg, GiB, 0.2, pp=2, dtype="bfloat16", pp_boundaries=(2,))
    assert plan.weights_per_rank == stages[1]
    assert plan.kv_bytes_per_token == kv_bytes_per_token(cfg, "bfloat16", 1, 6)
    with pytest.raises(ValueError, match=r"pp_boundaries=\(8,\)"):
        plan_memory(cfg, GiB, 0.2, pp=2, pp_boundaries=(8,))


@pytest.mark.parametrize("tied", [True, False])
def test_pp_stage_weights(tied: bool) -> None:
    cfg = _cfg("llama", "small", tie_word_embeddings=tied)  # 8 layers, h 512, vocab 4096
    h, vocab = 512, 4096
    layer = (weight_bytes_per_rank(cfg, "bfloat16", 1, 1) - 2 * (2 - tied) * vocab * h - 2 * h) // 8
    stages = [weight_bytes_per_rank(cfg, "bfloat16", 1, 3, r) for r in range(3)]
    # 8 layers over 3 stages: 3, 3, 2; embedding first; norm and LM head (a copy when tied) last.
    assert stages[0] == 3 * layer + 2 * vocab * h
    assert stages[1] == 3 * layer
    assert stages[2] == 2 * layer + 2 * h + 2 * vocab * h
    assert weight_bytes_per_rank(cfg, "bfloat16", 1, 3) == max(stages)
    total = weight_bytes_per_rank(cfg, "bfloat16", 1, 1)
    assert sum(stages) == total + (2 * vocab * h if tied else 0)
    with pytest.raises(ValueError, match="pp_rank=3"):
        weight_bytes_per_rank(cfg, "bfloat16", 1, 3, 3)


# ---------------------------------------------------------------- validation


def test_validate_layout_messages() -> None:
    cfg = _cfg("llama")  # 4 heads, 2 KV heads, inter 128, 4 layers
    with pytest.raises(
        ValueError,
        match=r"tp=3 does not divide num_attention_heads=4: valid tp values are 1, 2, 4$",
    ):
        validate_layout(cfg, 3, 1)
    with pytest.raises(ValueError, match=r"pp=5 .*num_hidden_layers=4.*valid pp values are 1 to 4"):
        validate_layout(cfg, 1, 5)
    with pytest.raises(ValueError, match="pp=0"):
        validate_layout(cfg, 1, 0)
    with pytest.raises(ValueError, match="tp=0 must be >= 1"):
        validate_layout(cfg, 0, 1)
    validate_layout(cfg, 4, 4)  # tp=4 > 2 KV heads: each replicated on two ranks
    validate_layout(_cfg("llama", num_key_value_heads=1), 2, 1)
    assert valid_tp_values(cfg) == [1, 2, 4]


def test_validate_layout_kv_and_intermediate() -> None:
    cfg = _cfg("llama", "medium")  # 12 heads, 4 KV heads, inter 3072
    with pytest.raises(
        ValueError, match=r"tp=6 exceeds num_key_value_heads=4 .*: valid tp values are 1, 2, 4, 12"
    ):
        validate_layout(cfg, 6, 1)
    cfg = _cfg("llama", num_attention_heads=6, num_key_value_heads=6, head_dim=16)
    with pytest.raises(ValueError, match="tp=6 does not divide intermediate_size=128"):
        validate_layout(cfg, 6, 1)
    moe = _cfg("qwen3_moe", moe_intermediate_size=34)
    with pytest.raises(ValueError, match="tp=4 does not divide moe_intermediate_size=34"):
        validate_layout(moe, 4, 1)
    validate_layout(moe, 2, 1)


def test_validate_layout_tp_not_dividing_kv_heads() -> None:
    cfg = _cfg("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    validate_layout(cfg, 8, 1)
    cfg = _cfg("llama", num_attention_heads=12, num_key_value_heads=6, head_dim=8)
    with pytest.raises(ValueError, match="tp=4 does not divide num_key_value_heads=6"):
        validate_layout(cfg, 4, 1)


# ---------------------------------------------------------------- KV and plans


def test_kv_formula_shared_with_engine_pool() -> None:
    cfg = _llama70b()
    assert kv_bytes_per_token(cfg, "bfloat16", 1) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(cfg, "bfloat16", 16) == 2 * 80 * 1 * 128 * 2  # replicated
    assert kv_block_bytes(cfg, 16, "bfloat16", 2) == 16 * kv_bytes_per_token(cfg, "bfloat16", 2)
    assert kv_block_bytes(cfg, 16, "bfloat16", 2, num_layers=40) * 2 == kv_block_bytes(
        cfg, 16, "bfloat16", 2
    )
    cache = CacheConfig(kv_cache_bytes=10 * GiB)
    plan = plan_memory(cfg, 80 * GiB, 0.2, tp=4, pp=2, dtype="bfloat16", context_len=8192)
    assert num_kv_blocks(cfg, cache, "bfloat16", 0, 4, num_layers=40) == 10 * GiB // (
        plan.kv_block_bytes
    )


def _llama70b_params(tp: int) -> int:
    h, q, kv, inter, vocab = 8192, 64 * 128, 8 * 128, 28672, 128256
    layer = h * (q + 2 * kv) // tp + h * q // tp + 3 * h * inter // tp + 2 * h
    return 80 * layer + 2 * vocab * h // tp + h


def test_plan_llama70b_like() -> None:
    cfg = _llama70b()
    assert _llama70b_params(1) == 70_553_706_496  # the published 70.6B
    budget = int(80 * GiB * 0.8)  # 68.72 GB
    one = plan_memory(cfg, 80 * GiB, 0.2, tp=1, dtype="auto", context_len=8192)
    assert one.dtype == "bfloat16"
    assert one.weights_per_rank == 2 * _llama70b_params(1)  # 141.1 GB
    assert not one.fits and one.kv_blocks == 0 and one.max_concurrent_seqs == 0
    assert "the smallest tp that fits at pp=1 is tp=4" in one.reason
    # tp=2: 70.6 GB of weights per rank exceed the 68.7 GB usable (64 GiB).
    two = plan_memory(cfg, 80 * GiB, 0.2, tp=2, dtype="bfloat16", context_len=8192)
    assert two.weights_per_rank == 2 * _llama70b_params(2) == 70_555_025_408 > budget
    assert not two.fits and "tp=4" in two.reason
    four = plan_memory(cfg, 80 * GiB, 0.2, tp=4, dtype="bfloat16", context_len=8192)
    assert four.fits and four.reason == ""
    assert four.weights_per_rank == 2 * _llama70b_params(4)  # 35.3 GB
    assert four.kv_bytes_per_token == 2 * 80 * 2 * 128 * 2 == 81_920
    blocks = (budget - four.weights_per_rank) // (81_920 * 16)
    assert four.kv_blocks == blocks == 25_513
    assert four.kv_tokens == blocks * 16
    assert four.blocks_per_seq == 512
    assert four.max_concurrent_seqs == blocks // 512 == 49


def test_plan_suggests_pp_when_no_tp_fits() -> None:
    cfg = _llama70b()
    plan = plan_memory(cfg, 80 * GiB, 0.2, tp=1, pp=2, dtype="bfloat16", context_len=8192)
    assert not plan.fits and "the smallest tp that fits at pp=2 is tp=2" in plan.reason
    # 8 GiB devices at the full 128K context: past tp=8 the KV heads replicate, so even
    # tp=64 cannot hold one sequence; pipeline stages split the layers' KV (and tp=16
    # pp=2, also 32 devices, holds too few blocks).
    small = plan_memory(cfg, 8 * GiB, 0.2, tp=64, dtype="bfloat16")
    assert not small.fits and "one sequence of context_len=131072 needs 8192" in small.reason
    assert "no tp fits at pp=1; the smallest layout that fits is tp=8 pp=4" in small.reason
    assert plan_memory(cfg, 8 * GiB, 0.2, tp=8, pp=4, dtype="bfloat16").fits
    assert not plan_memory(cfg, 8 * GiB, 0.2, tp=16, pp=2, dtype="bfloat16").fits
    plan = plan_memory(cfg, 100 * 2**20, 0.2, tp=1, dtype="bfloat16")
    assert not plan.fits and "no layout fits this device" in plan.reason


def test_plan_pp_uses_min_blocks_over_stages() -> None:
    cfg = _cfg("llama", "small")  # bf16, 8 layers
    plan = plan_memory(cfg, 64 * 2**20, 0.25, tp=2, pp=3, context_len=100)
    kv = [kv_bytes_per_token(cfg, "bfloat16", 2, n) * 16 for n in (3, 3, 2)]
    weights = [weight_bytes_per_rank(cfg, "bfloat16", 2, 3, r) for r in range(3)]
    budget = 48 * 2**20
    assert plan.kv_blocks == min((budget - w) // k for w, k in zip(weights, kv, strict=True))
    assert plan.kv_bytes_per_token * 16 == max(kv) and plan.weights_per_rank == max(weights)
    assert plan.blocks_per_seq == 7 and plan.max_concurrent_seqs == plan.kv_blocks // 7


def test_plan_rejects_bad_arguments() -> None:
    cfg = _cfg("llama")
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        plan_memory(cfg, GiB, 0.2, tp=3)
    with pytest.raises(ValueError, match="reserve must be in"):
        plan_memory(cfg, GiB, 1.0)
    with pytest.raises(ValueError, match="device memory must be > 0"):
        plan_memory(cfg, 0, 0.2)
    with pytest.raises(ValueError, match="context_len must be >= 1"):
        plan_memory(cfg, GiB, 0.2, context_len=0)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        plan_memory(cfg, GiB, 0.2, dtype="int8")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("80GiB", 80 * GiB),
        ("80GB", 80 * 10**9),
        ("1.5TiB", 3 * 2**39),
        ("512MiB", 512 * 2**20),
        ("1000000", 1_000_000),
        (" 24 gib ", 24 * GiB),
        ("4KB", 4000),
        ("0.5KiB", 512),
        ("100B", 100),
    ],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "80 GiBs", "-1GiB", "1e9", "80 XB", "1.2.3GB"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=f"cannot parse {text!r}"):
        parse_bytes(text)


def test_format_bytes() -> None:
    assert format_bytes(100) == "100 B"
    assert format_bytes(3 * 2**29) == "1.50 GiB"
    assert format_bytes(math.prod((2, 2**40))) == "2.00 TiB"
