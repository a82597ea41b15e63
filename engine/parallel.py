"""Tensor-parallel building blocks (Megatron style) and the rank's view of its group.

Column-parallel layers keep their output sharded, row-parallel layers all-reduce: a
decoder layer costs two all-reduces (after attention and after the MLP). Each weight
loader reads only its rank's slice from the checkpoint (``SliceLike``: a safetensors
slice or a tensor), so no rank ever holds the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from engine.gemv import linear


class SliceLike(Protocol):
    def __getitem__(self, index: Any) -> torch.Tensor: ...


def slice_shape(loaded: Any) -> list[int]:
    if hasattr(loaded, "get_shape"):
        return list(loaded.get_shape())
    return list(loaded.shape)


@dataclass
class ParallelContext:
    """This rank's place in its instance's tensor-parallel group (and MoE group).

    ``ep_size`` > 1 shards whole MoE experts over the *MoE group*
    (engine/expert_parallel.py): ``ep_size`` expert groups of ``moe_ranks // ep_size``
    consecutive ranks each, which split their experts' intermediate dim like a dense
    MLP. The MoE group is the TP group unless ``moe_size`` > 0 gives a separate one
    (``moe_group``, this rank being ``moe_rank`` of ``moe_size``): with ep > tp it is a
    stage's ep ranks, ep/tp replicas of the TP group, and the MoE combine all-reduces
    over it while attention, embedding and head stay within the TP group.
    """

    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None
    # Counted so tests and benchmarks can check the collectives per step.
    num_all_reduces: int = field(default=0)
    num_all_gathers: int = field(default=0)
    ep_size: int = 1
    moe_size: int = 0
    moe_rank: int = 0
    moe_group: Any = None

    def __post_init__(self) -> None:
        if self.moe_size and (
            self.moe_size % self.tp_size or not 0 <= self.moe_rank < self.moe_size
        ):
            raise ValueError(
                f"moe_size={self.moe_size} must be a multiple of tp_size={self.tp_size} "
                f"holding moe_rank={self.moe_rank}"
            )
        if self.ep_size < 1 or self.moe_ranks % self.ep_size:
            name = "moe_size" if self.moe_size else "tp_size"
            raise ValueError(f"ep_size={self.ep_size} must divide {name}={self.moe_ranks}")

    @property
    def moe_ranks(self) -> int:
        """Ranks of the MoE group: ``moe_size``, or the TP group's when it is 0."""
        return self.moe_size or self.tp_size

    @property
    def moe_index(self) -> int:
        """This rank's index in the MoE group."""
        return self.moe_rank if self.moe_size else self.tp_rank

    @property
    def ep_rank(self) -> int:
        """Which expert group (slice of the experts) this rank holds."""
        return self.moe_index // self.expert_tp_size

    @property
    def expert_tp_size(self) -> int:
        """Ranks sharing one expert group, splitting each expert's intermediate dim."""
        return self.moe_ranks // self.ep_size

    @property
    def expert_tp_rank(self) -> int:
        return self.moe_index % self.expert_tp_size

    def _sum_over(self, x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
        if size == 1:
            return x
        self.num_all_reduces += 1
        dist.all_reduce(x, group=group)
        return x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._sum_over(x, self.tp_size, self.group)

    def moe_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The MoE combine: sums the ranks' partial expert outputs over the MoE group
        (the TP group unless a wider MoE group is set)."""
        if not self.moe_size:
            return self.all_reduce(x)
        return self._sum_over(x, self.moe_size, self.moe_group)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        self.num_all_gathers += 1
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Part:
    """One fused piece of a column-parallel weight: ``global_rows`` split in
    ``num_parts`` (fewer than tp when KV heads are replicated), this rank holding
    part ``index``."""

    global_rows: int
    num_parts: int
    index: int

    @property
    def local_rows(self) -> int:
        return self.global_rows // self.num_parts


def head_part(num_heads: int, head_dim: int, pc: ParallelContext) -> Part:
    """Heads split over tp ranks; when tp > num_heads each head is replicated."""
    parts = min(pc.tp_size, num_heads)
    return Part(num_heads * head_dim, parts, pc.tp_rank * parts // pc.tp_size)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ (+ b) with W's rows split over ranks; ``parts`` fuse several HF weights
    (q/k/v, gate/up) into one matmul, loaded with ``shard`` = the part's index."""

    def __init__(self, in_features: int, parts: list[Part], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.parts = parts
        self.offsets = [sum(p.local_rows for p in parts[:i]) for i in range(len(parts))]
        out = sum(p.local_rows for p in parts)
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out, dtype=dtype), requires_grad=False) if bias else None
        )

    def num_shards(self, name: str) -> int:
        return len(self.parts)

    def load(self, name: str, loaded: SliceLike, shard: int) -> None:
        part = self.parts[shard]
        start = part.index * part.local_rows
        rows = loaded[start : start + part.local_rows]
        target = self.weight if name == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {name} this layer does not use")
        target.data[self.offsets[shard] : self.offsets[shard] + part.local_rows].copy_(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shardᵀ) + b with W's columns split over ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        pc: ParallelContext,
    ):
        super().__init__()
        self.pc = pc
        self.local_in = in_features // pc.tp_size
        self.weight = nn.Parameter(
            torch.empty(out_features, self.local_in, dtype=dtype), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    def load(self, name: str, loaded: SliceLike, shard: int) -> None:
        if name == "bias" and self.bias is not None:
            self.bias.data.copy_(loaded[:])
            return
        start = self.pc.tp_rank * self.local_in
        self.weight.data.copy_(loaded[:, start : start + self.local_in])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pc.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks; ids outside this rank's range give zeros, then
    an all-reduce sums the one rank that owns each id."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, pc: ParallelContext):
        super().__init__()
        self.pc = pc
        self.vocab_size = vocab_size
        self.local_vocab = -(-vocab_size // pc.tp_size)
        self.start = pc.tp_rank * self.local_vocab
        self.weight = nn.Parameter(
            torch.zeros(self.local_vocab, hidden, dtype=dtype), requires_grad=False
        )

    def load(self, name: str, loaded: SliceLike, shard: int) -> None:
        end = min(self.start + self.local_vocab, self.vocab_size)
        self.weight.data[: end - self.start].copy_(loaded[self.start : end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pc.tp_size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local_vocab)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.pc.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab logits in fp32 (this module doubles as the LM head); gathered over ranks."""
        local = linear(hidden, self.weight).float()
        return self.pc.all_gather_last_dim(local)[..., : self.vocab_size]
