"""Leaf layers: RMSNorm (with fused residual add) and rotary embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from engine import gemv, single_row
from engine.model_config import RopeConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 like the reference. With ``residual`` given, adds it
    first and returns (normed, new residual) so the add is not a separate pass."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused call, bit-equal to the steps below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if gemv.active() and (fused := single_row.add_rms_norm(x, residual, self.weight, self.eps)):
            return fused  # a single-row step on the CPU: one C call
        if residual is not None:
            x = x + residual
        return self._norm(x), x

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths divided by factor, short kept, smooth blend between.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half (non-interleaved) RoPE from a precomputed fp32 cos/sin table."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, signed sin)`` of ``positions``, ``[N, 1, head_dim]`` fp32, for
        :meth:`rotate`: what every layer of a step shares (compute once per step)."""
        cos, sin = self.cos[positions], self.sin[positions]
        return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]

    def rotate(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x`` (``[N, heads, head_dim]``, any heads: q and k together) rotated by the
        positions of ``tables``; in fp32, bit-equal to rotating each half apart."""
        cos, sin = tables
        xf = x if x.dtype == torch.float32 else x.float()
        half = x.shape[-1] // 2
        swapped = torch.cat((xf[..., half:], xf[..., :half]), dim=-1)
        out = xf * cos + swapped * sin
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.tables(positions)
        return self.rotate(q, tables), self.rotate(k, tables)
