"""The C library for batch-1 CPU decode (``engine.single_row``, ``engine.fused_layer``):
its GEMV against torch, a fused decoder layer against the layer's torch path, and the
engine's tokens and logprobs with and without it, per model family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional as F

from decode.llm import LLM
from engine import single_row
from engine.config import CacheConfig, EngineConfig
from engine.forward_batch import ForwardBatch
from engine.fused_layer import FusedDecodeLayer
from engine.model import DecoderLayer
from engine.sampling_params import SamplingParams
from tests.engine.hf_models import FAMILIES, build_hf_model

pytestmark = pytest.mark.skipif(single_row.library() is None, reason="no C compiler here")
PROMPT = list(range(3, 40))


@pytest.mark.parametrize("rows,cols", [(1, 8), (3, 5), (96, 64), (130, 200), (4096, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_torch(rows: int, cols: int, bias: bool) -> None:
    single_row.start(2)
    w, x = torch.randn(rows, cols), torch.randn(1, cols)
    b = torch.randn(rows) if bias else None
    got = single_row.gemv(x, w, b)
    assert got is not None and got.shape == (1, rows)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4)  # sum order


def test_gemv_declines_what_it_does_not_serve() -> None:
    w, x = torch.randn(16, 8), torch.randn(1, 8)
    assert single_row.gemv(x.bfloat16(), w.bfloat16(), None) is None
    assert single_row.gemv(x, torch.randn(8, 16).t(), None) is None  # not contiguous
    assert single_row.gemv(torch.randn(1, 9), w, None) is None  # widths differ
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        single_row.start(0)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp(f"sr-{request.param}")
    build_hf_model(request.param, path)
    cfg = EngineConfig(
        model=str(path), dtype="float32", num_threads=2, cache=CacheConfig(num_blocks=64)
    )
    return request.param, LLM(cfg)


def layers(llm: LLM) -> list[DecoderLayer]:
    return [m for m in llm.runner.model.model.layers if isinstance(m, DecoderLayer)]


def one_token_batch(slot: int, ctx: int, table: list[int], position: int) -> ForwardBatch:
    empty = torch.zeros(0, dtype=torch.int32)
    return ForwardBatch(
        input_ids=torch.tensor([5]),
        positions=torch.tensor([position]),
        slot_mapping=torch.tensor([slot]),
        num_prefill_tokens=0,
        prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
        prefill_context_lens=empty,
        prefill_block_tables=torch.zeros(0, 1, dtype=torch.int32),
        decode_context_lens=torch.tensor([ctx], dtype=torch.int32),
        decode_block_tables=torch.tensor([table], dtype=torch.int32),
        logits_indices=torch.tensor([0]),
    )


def dense_layer(llm: LLM) -> tuple[DecoderLayer, FusedDecodeLayer]:
    layer = next(x for x in layers(llm) if x.fused is not None)
    assert layer.fused is not None
    return layer, layer.fused


def test_fused_layer_equals_the_layers_torch_path(family: Any) -> None:
    name, llm = family
    fused = [layer.fused is not None for layer in layers(llm)]
    assert not all(fused) if name == "qwen3_moe" else all(fused)  # MoE layers: torch
    layer, fast = dense_layer(llm)
    k, v = llm.runner.kv_caches[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, layer.input_layernorm.weight.shape[0], generator=gen)
    batch = one_token_batch(slot=2 * 16 + 5, ctx=38, table=[7, 1, 2, 9], position=37)
    for residual in (None, torch.randn(x.shape, generator=gen)):
        cache = (torch.randn(k.shape, generator=gen), torch.randn(v.shape, generator=gen))
        kv_fast, kv_torch = [(cache[0].clone(), cache[1].clone()) for _ in range(2)]
        with llm.runner.gemv.step(1):
            got = fast(batch.positions, x, residual, batch, kv_fast)
        assert got is not None
        want = layer(batch.positions, x, residual, batch, kv_torch)  # outside a step: torch
        for a, b in zip((*got, *kv_fast), (*want, *kv_torch), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "slot,ctx,table",
    [(64 * 16, 3, [0]), (-1, 3, [0]), (0, 0, [0]), (0, 17, [0]), (0, 20, [0, 64]), (0, 3, [-2])],
)
def test_a_step_outside_the_cache_raises_before_storing(
    family: Any, slot: int, ctx: int, table: list[int]
) -> None:
    llm = family[1]
    layer, fast = dense_layer(llm)
    k, v = (t.clone() for t in llm.runner.kv_caches[0])
    before = k.clone()
    x = torch.randn(1, layer.input_layernorm.weight.shape[0])
    batch = one_token_batch(slot, ctx, table, position=max(ctx - 1, 0))
    with llm.runner.gemv.step(1), pytest.raises(ValueError, match=f"slot {slot}, context {ctx}"):
        fast(batch.positions, x, None, batch, (k, v))
    assert torch.equal(k, before)


def test_engine_tokens_and_logprobs_equal_the_torch_path(
    family: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = family[1]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    calls: list[bool] = []
    call = FusedDecodeLayer.__call__

    def counted(self: FusedDecodeLayer, *args: Any) -> Any:
        out = call(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(FusedDecodeLayer, "__call__", counted)
    (fast,) = llm.generate([PROMPT], params)
    monkeypatch.setattr(single_row, "library", lambda: None)
    (slow,) = llm.generate([PROMPT], params)
    assert fast.token_ids == slow.token_ids and len(fast.token_ids) == 24
    for a, b in zip(fast.logprobs, slow.logprobs, strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    dense = sum(layer.fused is not None for layer in layers(llm))
    assert calls.count(True) == 23 * dense  # every decode step, every dense layer
