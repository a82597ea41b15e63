"""Expert parallelism (EP) for Qwen3-MoE inside an instance's tensor-parallel group.

Design. With ``ep`` > 1 the TP group of ``tp`` ranks is cut into ``ep`` *expert groups*
of ``tp // ep`` consecutive ranks. Expert group ``g`` owns the whole experts
``[g·E/ep, (g+1)·E/ep)``; inside the group each expert's intermediate dim is split over
its ``tp // ep`` ranks exactly as plain TP splits it. So ``ep == tp`` gives every rank
``E/tp`` whole experts (full intermediate size) and ``ep == 1`` is plain TP. Attention,
the dense MLPs, embedding and LM head stay tensor-parallel over the whole group.

Dispatch. Activations are replicated on every rank of the TP group after each
all-reduce, and the router's weight is replicated too, so every rank computes the same
routing for every token. Each rank then keeps only the (token, k) pairs routed to *its*
experts: dispatch costs no communication. Combine: each rank scatters its weighted
partial outputs into a zero [tokens, hidden] tensor, and the block's one all-reduce
(the same one plain TP already pays) sums the disjoint expert contributions and the
intermediate-dim partial sums. So EP costs exactly TP's collectives: one all-reduce of
[tokens, hidden] per MoE layer. A *sequence-sharded* design (each rank holding only its
own tokens, as in data-parallel attention) would instead need an all-to-all to send
tokens to the ranks owning their experts and a second all-to-all to bring the outputs
back; that pays off when tokens per rank are many, and is not built here.

EP wider than TP (``ep`` a multiple of ``tp``, e.g. tp=1 ep=2). A pipeline stage then
has ``ep`` ranks: ``ep/tp`` replicas of the TP group, each computing attention, norms,
embedding and LM head redundantly (identical inputs, so identical outputs), and one
*MoE group* of all ``ep`` ranks (``ParallelContext.moe_group``) over which the experts
are split, ``E/ep`` whole experts per rank, and the MoE combine all-reduces. At tp=1
that all-reduce per MoE layer is the step's only collective. ``ep <= tp`` keeps the MoE
group = the TP group, as above.

Why EP at all when TP already splits experts: whole experts mean one matmul per
expert of full width instead of ``tp`` narrow ones, and a rank only reads its experts'
weights, not a slice of every expert.

Load. Every rank sees every routing decision, so ``SparseMoeBlock.expert_tokens`` is
the global count of (token, k) pairs per expert; ``expert_load`` sums it over layers
and reports the hotspot ratio (max/mean tokens per expert, and per EP rank), the figure
that says how unevenly a static expert placement loads the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.model_config import ModelConfig


def validate_ep(cfg: ModelConfig, tp: int, ep: int) -> None:
    """Raises ValueError when ``ep`` expert groups cannot split ``cfg`` over ``tp`` ranks."""
    if ep < 1:
        raise ValueError(f"ep must be >= 1, got {ep}")
    if ep == 1:
        return
    if not cfg.num_experts:
        raise ValueError(f"ep={ep} needs a mixture-of-experts model; {cfg.model_type} has none")
    if tp % ep and ep % tp:
        divisors = [d for d in range(1, tp + 1) if tp % d == 0 and cfg.num_experts % d == 0]
        raise ValueError(
            f"ep={ep} must divide tp={tp} (experts sharded within the TP group) or be a "
            f"multiple of it (ep/tp TP replicas); ep in {divisors} or a multiple of tp would"
        )
    if cfg.num_experts % ep:
        raise ValueError(f"ep={ep} does not divide num_experts={cfg.num_experts}")
    if tp > ep and cfg.moe_intermediate_size % (tp // ep):
        raise ValueError(
            f"tp/ep={tp // ep} does not divide moe_intermediate_size={cfg.moe_intermediate_size}"
        )


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The global expert ids expert group ``ep_rank`` owns (a contiguous block)."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide num_experts={num_experts}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} is outside ep_size={ep_size}")
    n = num_experts // ep_size
    return range(ep_rank * n, (ep_rank + 1) * n)


@dataclass(frozen=True)
class ExpertLoad:
    """(token, k) pairs routed to each expert, summed over the MoE layers since load
    (or the last ``reset_expert_load``), and how they fall on ``ep_size`` ranks."""

    tokens_per_expert: list[int]
    ep_size: int = 1

    @property
    def tokens_per_rank(self) -> list[int]:
        n = len(self.tokens_per_expert) // self.ep_size
        return [sum(self.tokens_per_expert[r * n : (r + 1) * n]) for r in range(self.ep_size)]

    @property
    def hotspot_ratio(self) -> float:
        """max/mean tokens per expert: 1.0 is perfectly even; 0.0 when nothing ran."""
        return _max_over_mean(self.tokens_per_expert)

    @property
    def rank_hotspot_ratio(self) -> float:
        """max/mean tokens per EP rank: the slowest rank's excess work."""
        return _max_over_mean(self.tokens_per_rank)


def _max_over_mean(values: list[int]) -> float:
    total = sum(values)
    return max(values) * len(values) / total if total else 0.0


def _moe_counters(model: nn.Module) -> list[torch.Tensor]:
    counters = [getattr(m, "expert_tokens", None) for m in model.modules()]
    return [c for c in counters if isinstance(c, torch.Tensor)]


def expert_load(model: nn.Module, ep_size: int = 1) -> ExpertLoad:
    """Tokens per expert summed over ``model``'s MoE blocks. Raises ValueError for a
    model without MoE blocks."""
    counters = _moe_counters(model)
    if not counters:
        raise ValueError(f"{type(model).__name__} has no MoE blocks to count expert load in")
    total = torch.stack(counters).sum(dim=0)
    return ExpertLoad([int(t) for t in total.tolist()], ep_size)


def reset_expert_load(model: nn.Module) -> None:
    """Zeroes every MoE block's per-expert token counter (e.g. after warm-up)."""
    for c in _moe_counters(model):
        c.zero_()
