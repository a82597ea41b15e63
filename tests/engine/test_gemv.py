"""Single-row linear layers through OpenBLAS's GEMV (the path where the C library of
``engine.single_row`` is not built; tests/engine/test_single_row.py covers that one):
same results, taken only inside a single-row step, torch's threads restored after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import engine.gemv as gemv
import router.cli
from decode.llm import LLM
from engine import single_row
from engine.config import CacheConfig, EngineConfig
from engine.gemv import SingleRowGemv, linear
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(autouse=True)
def without_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without a C compiler (or with ``PDSERVE_CPU_KERNELS=0``)."""
    monkeypatch.setattr(single_row, "library", lambda: None)


def make(threads: int = 1) -> SingleRowGemv:
    g = SingleRowGemv(threads, torch.device("cpu"))
    if g.blas is None:
        pytest.skip("numpy's BLAS is not OpenBLAS here")
    return g


class CountingNumpy:
    """Delegates to numpy and counts ``dot`` calls (the GEMV path's only call)."""

    def __init__(self) -> None:
        self.dots = 0

    def dot(self, *args: Any) -> Any:
        self.dots += 1
        return np.dot(*args)


def test_one_row_inside_a_step_matches_torch_with_and_without_bias() -> None:
    g, counter = make(), CountingNumpy()
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(1, 64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemv, "np", counter)
        with g.step(1):
            got, got_bias = linear(x, w), linear(x, w, b)
    assert counter.dots == 2
    assert got.shape == (1, 96)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_bias, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_a_replaced_weight_is_read_anew() -> None:
    # The weight's numpy array is kept between calls, but not past a new storage.
    g = make()
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(1, 64)
    got, want = [], []
    with torch.no_grad(), g.step(1):
        for change in (None, "new storage", "in place"):
            if change == "new storage":
                layer.weight.data = torch.randn(32, 64)
            elif change == "in place":
                layer.weight.copy_(torch.randn(32, 64))
            got.append(linear(x, layer.weight))
            want.append(F.linear(x, layer.weight))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(want[0], want[1]) and not torch.equal(want[1], want[2])


def test_other_calls_are_torch_exactly() -> None:
    g, counter = make(), CountingNumpy()
    w, x2 = torch.randn(32, 16), torch.randn(2, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemv, "np", counter)
        outside = linear(x2[:1], w)  # one row, but no step
        with g.step(1):
            two_rows = linear(x2, w)
            half = linear(x2[:1].bfloat16(), w.bfloat16())
        with g.step(2):
            wide_step = linear(x2[:1], w)
    assert counter.dots == 0
    assert torch.equal(outside, F.linear(x2[:1], w))
    assert torch.equal(two_rows, F.linear(x2, w))
    assert torch.equal(half, F.linear(x2[:1].bfloat16(), w.bfloat16()))
    assert torch.equal(wide_step, F.linear(x2[:1], w))


def test_step_runs_torch_on_one_thread_and_restores_it() -> None:
    before = torch.get_num_threads()
    g = make(threads=2)
    g.enabled = True  # as with OPENBLAS_THREAD_TIMEOUT set at start-up
    try:
        with g.step(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), g.step(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        with g.step(3):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_several_threads_need_the_quiet_openblas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    assert not SingleRowGemv(2, torch.device("cpu")).enabled
    assert make(threads=1).enabled  # one thread: OpenBLAS starts no worker to spin
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")
    assert make(threads=2).enabled
    assert not SingleRowGemv(2, torch.device("meta")).enabled
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        SingleRowGemv(0, torch.device("cpu"))


def test_the_command_line_sets_the_same_environment() -> None:
    assert router.cli.BLAS_ENV == gemv.BLAS_ENV


def test_batch_one_greedy_tokens_equal_the_torch_path(tiny_llama: Path) -> None:
    def run(enabled: bool) -> tuple[list[int], int]:
        cfg = EngineConfig(model=str(tiny_llama), num_threads=1, cache=CacheConfig(num_blocks=64))
        llm = LLM(cfg)
        if llm.runner.gemv.blas is None:
            pytest.skip("numpy's BLAS is not OpenBLAS here")
        llm.runner.gemv.enabled = enabled
        counter = CountingNumpy()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gemv, "np", counter)
            out = llm.generate([list(range(3, 30))], GREEDY)[0].token_ids
        return out, counter.dots

    fast, dots = run(True)
    slow, none = run(False)
    assert fast == slow and len(fast) == 24
    # Every decode step (23) runs its linears through the GEMV: 4 per layer plus the head.
    assert none == 0 and dots > 0 and dots % 23 == 0
