"""Sparse MoE block (Qwen3-MoE): top-k softmax routing over fused per-expert weights,
experts optionally sharded over ranks (expert parallelism, engine/expert_parallel.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.expert_parallel import expert_range
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
    """This rank's experts' weights as 3-D tensors: ``w13`` = [E_local, 2·I_local, H]
    (gate; up), ``w2`` = [E_local, H, I_local].

    Plain TP (``ep_size`` = 1): every expert, its intermediate dim split over the tp
    ranks like a dense MLP. EP: the rank's expert group owns ``E/ep`` whole experts
    (``expert_ids``), split over the ``tp/ep`` ranks of the group (see
    engine/expert_parallel.py). Either way the block ends in one all-reduce."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pc: ParallelContext):
        super().__init__()
        self.pc = pc
        self.expert_ids = expert_range(cfg.num_experts, pc.ep_size, pc.ep_rank)
        self.local_inter = cfg.moe_intermediate_size // pc.expert_tp_size
        e, h, i = len(self.expert_ids), cfg.hidden_size, self.local_inter
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=dtype), requires_grad=False)

    def num_shards(self, name: str) -> int:
        # Local experts only: the loader checks it got at least this many shards, and
        # it also counts the other ranks' experts, which ``load`` skips.
        return self.w13.shape[0] * (2 if name == "w13" else 1)

    def load(self, name: str, loaded: SliceLike, shard: Any) -> None:
        expert, which = shard  # which: 0 gate, 1 up, 2 down
        if expert not in self.expert_ids:
            return  # another expert group's: never read from the file
        local = expert - self.expert_ids.start
        i, start = self.local_inter, self.pc.expert_tp_rank * self.local_inter
        if which == 2:
            self.w2.data[local].copy_(loaded[:, start : start + i])
        else:
            self.w13.data[local, which * i : (which + 1) * i].copy_(loaded[start : start + i])


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
        counts = torch.bincount(flat, minlength=self.num_experts)
        self.expert_tokens += counts  # global: every rank routes every token
        # Keep only the (token, k) pairs routed to this rank's experts (all of them
        # without EP), ordered by expert so each expert's rows are contiguous.
        ids = self.experts.expert_ids
        mine = ((flat >= ids.start) & (flat < ids.stop)).nonzero().squeeze(-1)
        order = mine[flat[mine].argsort(stable=True)]
        token_of = order // self.top_k
        xs = x[token_of]
        ys = torch.empty_like(xs)
        start = 0
        i = self.experts.local_inter
        for e, n in enumerate(counts[ids.start : ids.stop].tolist()):
            if n == 0:
                continue
            h = nn.functional.linear(xs[start : start + n], self.experts.w13[e])
            a = nn.functional.silu(h[:, :i]) * h[:, i:]
            ys[start : start + n] = nn.functional.linear(a, self.experts.w2[e])
            start += n
        ys = ys * weights.flatten()[order].to(x.dtype).unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_of, ys)
        return self.pc.moe_all_reduce(out)
