"""Weights moved into the huge-page arena (``engine.huge_pages``)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from engine.huge_pages import WeightArena, move_to_huge_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def test_parameters_move_with_their_values_and_shared_ones_once() -> None:
    emb = nn.Embedding(100, 24)
    head = nn.Linear(24, 100, bias=True)
    head.weight = emb.weight  # tied, as an LM head
    model = nn.ModuleDict({"emb": emb, "head": head, "norm": nn.LayerNorm(24)})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    arena = move_to_huge_pages(model)
    assert arena is not None
    lo = arena.buffer.data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert lo <= p.data_ptr() < lo + arena.used and p.data_ptr() % 64 == 0
    assert head.weight is emb.weight
    unique = {p.data_ptr(): p.numel() * 4 for p in model.parameters()}
    assert arena.used == sum(-(-n // 64) * 64 for n in unique.values())
    x = torch.tensor([3, 7])
    assert torch.equal(
        head(emb(x)),
        nn.functional.linear(before["emb.weight"][x], before["emb.weight"], before["head.bias"]),
    )


def test_an_arena_refuses_more_than_it_holds() -> None:
    arena = WeightArena(128)
    arena.take(torch.zeros(16))
    with pytest.raises(ValueError, match="arena of 128 bytes cannot hold 192"):
        arena.take(torch.zeros(17))


def test_nothing_to_move() -> None:
    assert move_to_huge_pages(nn.ReLU()) is None
