"""The C library for batch-1 CPU decode (``engine.single_row``, ``engine.fused_stack``):
its GEMV against torch, a stage's fused decoder layers against their torch path, and
the engine's tokens and logprobs with and without it, per model family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional as F

from decode.llm import LLM
from engine import single_row
from engine.config import CacheConfig, EngineConfig
from engine.forward_batch import ForwardBatch
from engine.fused_stack import FusedDecodeStack
from engine.layers import RMSNorm
from engine.sampling_params import SamplingParams
from tests.engine.hf_models import FAMILIES, build_hf_model

pytestmark = pytest.mark.skipif(single_row.library() is None, reason="no C compiler here")
PROMPT = list(range(3, 40))


@pytest.mark.parametrize("rows,cols", [(1, 8), (3, 5), (96, 64), (130, 200), (4096, 512)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(rows: int, cols: int, m: int, bias: bool) -> None:
    single_row.start(2)
    w, x = torch.randn(rows, cols), torch.randn(m, cols)
    b = torch.randn(rows) if bias else None
    got = single_row.linear(x, w, b)  # GEMV for one row, GEMM tiles of 4 x 3 and edges
    assert got is not None and got.shape == (m, rows)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4)  # sum order


def test_linear_declines_what_it_does_not_serve() -> None:
    w, x = torch.randn(16, 8), torch.randn(1, 8)
    assert single_row.linear(x.bfloat16(), w.bfloat16(), None) is None
    assert single_row.linear(x, torch.randn(8, 16).t(), None) is None  # not contiguous
    assert single_row.linear(torch.randn(1, 9), w, None) is None  # widths differ
    assert single_row.linear(torch.randn(single_row.MAX_ROWS + 1, 8), w, None) is None
    assert single_row.linear(torch.randn(8), w, None) is None  # not rows
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        single_row.start(0)


def test_pooled_attention_matches_the_reference() -> None:
    from engine.attention import cpu_decode, reference
    from engine.gemv import SingleRowGemv

    gen = torch.Generator().manual_seed(1)
    k = torch.randn(40, 16, 2, 64, generator=gen)
    v = torch.randn(40, 16, 2, 64, generator=gen)
    q = torch.randn(5, 8, 64, generator=gen)
    ctx = torch.tensor([1, 17, 40, 16, 100], dtype=torch.int32)
    tables = torch.randperm(40, generator=gen)[:35].reshape(5, 7).to(torch.int32)
    want = reference.decode_attention(q, k, v, ctx, tables, 0.125)
    with SingleRowGemv(2, torch.device("cpu"), single_row.MAX_ROWS).step(5):
        got = cpu_decode.decode_attention(q, k, v, ctx, tables, 0.125)
        tables[4, 6] = 99  # outside the cache
        with pytest.raises(ValueError, match="outside the cache"):
            cpu_decode.decode_attention(q, k, v, ctx, tables, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_the_torch_norm(with_residual: bool) -> None:
    norm = RMSNorm(200, 1e-5, torch.float32)
    norm.weight.data.normal_()
    x = torch.randn(1, 200)
    residual = torch.randn(1, 200) if with_residual else None
    got = single_row.add_rms_norm(x, residual, norm.weight, norm.eps)
    assert got is not None
    torch.testing.assert_close(got, norm(x, residual), rtol=1e-5, atol=1e-5)  # not in a step
    assert single_row.add_rms_norm(torch.randn(2, 200), None, norm.weight, 1e-5) is None
    assert single_row.add_rms_norm(x.double(), None, norm.weight, 1e-5) is None


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp(f"sr-{request.param}")
    build_hf_model(request.param, path)
    cfg = EngineConfig(
        model=str(path), dtype="float32", num_threads=2, cache=CacheConfig(num_blocks=64)
    )
    return request.param, LLM(cfg)


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


def stack_of(llm: LLM) -> FusedDecodeStack:
    stack = llm.runner.model.model.fused
    assert stack is not None
    return stack


def random_caches(llm: LLM, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randn(k.shape, generator=gen), torch.randn(v.shape, generator=gen))
        for k, v in llm.runner.kv_caches
    ]


def test_fused_stack_equals_the_layers_torch_path(family: Any) -> None:
    name, llm = family
    if name == "qwen3_moe":  # MoE layers (and so the stage) keep the torch path
        assert llm.runner.model.model.fused is None
        return
    model, stack = llm.runner.model.model, stack_of(llm)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, stack.hidden, generator=gen)
    batch = one_token_batch(slot=2 * 16 + 5, ctx=38, table=[7, 1, 2, 9], position=37)
    for residual in (None, torch.randn(x.shape, generator=gen), None):
        caches = random_caches(llm, gen)  # new tensors each time: laid out again
        kv_fast = [(k.clone(), v.clone()) for k, v in caches]
        with llm.runner.gemv.step(1):
            got = stack(batch, x, residual, kv_fast)
        assert got is not None and stack.laid_out is not None
        want = model.run_layers(batch, x, residual, caches)  # outside a step: torch
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kv_fast, caches, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "slot,ctx,table",
    [(64 * 16, 3, [0]), (-1, 3, [0]), (0, 0, [0]), (0, 17, [0]), (0, 20, [0, 64]), (0, 3, [-2])],
)
def test_a_step_outside_the_cache_raises_before_storing(
    family: Any, slot: int, ctx: int, table: list[int]
) -> None:
    name, llm = family
    if name == "qwen3_moe":
        return
    stack = stack_of(llm)
    caches = [(k.clone(), v.clone()) for k, v in llm.runner.kv_caches]
    before = [k.clone() for k, _ in caches]
    x = torch.randn(1, stack.hidden)
    batch = one_token_batch(slot, ctx, table, position=max(ctx - 1, 0))
    with llm.runner.gemv.step(1), pytest.raises(ValueError, match=f"slot {slot}, context {ctx}"):
        stack(batch, x, None, caches)
    assert all(torch.equal(k, b) for (k, _), b in zip(caches, before, strict=True))


def test_engine_tokens_and_logprobs_equal_the_torch_path(
    family: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, llm = family
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    calls: list[bool] = []
    call = FusedDecodeStack.__call__

    def counted(self: FusedDecodeStack, *args: Any) -> Any:
        out = call(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(FusedDecodeStack, "__call__", counted)
    (fast,) = llm.generate([PROMPT], params)
    monkeypatch.setattr(single_row, "library", lambda: None)
    (slow,) = llm.generate([PROMPT], params)
    assert fast.token_ids == slow.token_ids and len(fast.token_ids) == 24
    for a, b in zip(fast.logprobs, slow.logprobs, strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # every decode step of the fast run, none of the prefill or the library-less run
    assert calls.count(True) == (0 if name == "qwen3_moe" else 23)


def test_batched_steps_equal_the_torch_path(family: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    name, llm = family
    prompts = [PROMPT, PROMPT[:9], PROMPT[4:30]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1)
        for n in (20, 12, 16)
    ]
    gemms: list[int] = []
    linear = single_row.linear

    def counted(x: torch.Tensor, *args: Any) -> Any:
        out = linear(x, *args)
        gemms.append(x.shape[0] if out is not None else 0)
        return out

    monkeypatch.setattr(single_row, "linear", counted)
    fast = llm.generate(prompts, params)
    monkeypatch.setattr(single_row, "library", lambda: None)
    slow = llm.generate(prompts, params)
    for a, b, p in zip(fast, slow, params, strict=True):
        assert a.token_ids == b.token_ids and len(a.token_ids) == p.max_tokens
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    # rows of 3, then 2 as the shortest finishes: the GEMM (MoE: torch's path throughout)
    assert (name == "qwen3_moe") == (not any(r > 1 for r in gemms))
