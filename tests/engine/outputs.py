"""Comparing two runs' outputs: the parallel layouts against the single-rank engine."""

from __future__ import annotations

import pytest

from decode.llm import RequestOutput

ATOL = 1e-4


def assert_same_outputs(
    ours: list[RequestOutput], ref: list[RequestOutput], atol: float = ATOL
) -> None:
    """Same greedy tokens, and the sampled and top-n logprobs within ``atol``."""
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref, strict=True):
        assert o.token_ids == r.token_ids
        assert len(o.logprobs) == len(o.token_ids)
        for lo, lr in zip(o.logprobs, r.logprobs, strict=True):
            assert lo.logprob == pytest.approx(lr.logprob, abs=atol)
            assert [t for t, _ in lo.top] == [t for t, _ in lr.top]
            assert [p for _, p in lo.top] == pytest.approx([p for _, p in lr.top], abs=atol)
