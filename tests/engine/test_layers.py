"""Leaf layers: the fused fp32 RMSNorm and the one-call q+k rotation are bit-equal to
the step-by-step formulas they replace (HF's)."""

from __future__ import annotations

import pytest
import torch

from engine.forward_batch import ForwardBatch
from engine.layers import RMSNorm, RotaryEmbedding
from engine.model_config import RopeConfig


def _hf_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_reference_formula(dtype: torch.dtype) -> None:
    norm = RMSNorm(96, 1e-6, dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    x, residual = torch.randn(2, 5, 96).to(dtype).unbind(0)
    out, summed = norm(x, residual)
    assert torch.equal(summed, x + residual)
    assert torch.equal(out, _hf_norm(x + residual, norm.weight, 1e-6))


def _half_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_the_half_rotation(dtype: torch.dtype) -> None:
    rope = RotaryEmbedding(64, 512, RopeConfig())
    positions = torch.tensor([0, 7, 300, 511])
    qk = torch.randn(4, 6, 64).to(dtype)  # q and k heads together, as the model does
    got = rope.rotate(qk, rope.tables(positions))
    cos, sin = rope.cos[positions][:, None], rope.sin[positions][:, None]
    assert got.dtype == dtype and torch.equal(got, _half_rotation(qk, cos, sin))
    q, k = rope(positions, qk[:, :4], qk[:, 4:])
    assert torch.equal(torch.cat((q, k), 1), got)


def test_batch_memo_computes_once() -> None:
    t = torch.zeros(0, dtype=torch.int64)
    batch = ForwardBatch(t, t, t, 0, t, t, t.reshape(0, 0), t, t.reshape(0, 0), t)
    calls: list[int] = []
    for _ in range(3):
        assert batch.memo("plan", lambda: calls.append(1) or len(calls)) == 1
    assert calls == [1] and batch.memo("other", lambda: 7) == 7
