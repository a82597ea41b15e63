"""Sparse MoE block (Qwen3-MoE): top-k softmax routing over fused per-expert weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.model_config import ModelConfig
from engine.parallel import ParallelContext, SliceLike


class Router(nn.Module):
    """The gate: one logit per expert, replicated on every rank."""

    def __init__(self, hidden: int, num_experts: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden, dtype=dtype), requires_grad=False
        )


class Experts(nn.Module):
    """All experts' weights as 3-D tensors: ``w13`` = [E, 2·I/tp, H] (gate; up), ``w2`` =
    [E, H, I/tp]. Each expert's intermediate dim is split over TP ranks like a dense MLP,
    so the block ends in one all-reduce."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pc: ParallelContext):
        super().__init__()
        self.pc = pc
        self.local_inter = cfg.moe_intermediate_size // pc.tp_size
        e, h, i = cfg.num_experts, cfg.hidden_size, self.local_inter
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=dtype), requires_grad=False)

    def num_shards(self, name: str) -> int:
        return self.w13.shape[0] * (2 if name == "w13" else 1)

    def load(self, name: str, loaded: SliceLike, shard: Any) -> None:
        expert, which = shard  # which: 0 gate, 1 up, 2 down
        i, start = self.local_inter, self.pc.tp_rank * self.local_inter
        if which == 2:
            self.w2.data[expert].copy_(loaded[:, start : start + i])
        else:
            self.w13.data[expert, which * i : (which + 1) * i].copy_(loaded[start : start + i])


class SparseMoeBlock(nn.Module):
    """Routes each token to its top-k experts and sums their outputs by routing weight."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pc: ParallelContext):
        super().__init__()
        self.pc = pc
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.num_experts
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Router(cfg.hidden_size, cfg.num_experts, dtype)
        self.experts = Experts(cfg, dtype, pc)
        self.expert_tokens = torch.zeros(cfg.num_experts, dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = nn.functional.linear(x, self.gate.weight).softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        self.expert_tokens += counts
        token_of = order // self.top_k
        xs = x[token_of]
        ys = torch.empty_like(xs)
        start = 0
        i = self.experts.local_inter
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            h = nn.functional.linear(xs[start : start + n], self.experts.w13[e])
            a = nn.functional.silu(h[:, :i]) * h[:, i:]
            ys[start : start + n] = nn.functional.linear(a, self.experts.w2[e])
            start += n
        ys = ys * weights.flatten()[order].to(x.dtype).unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_of, ys)
        return self.pc.all_reduce(out)
