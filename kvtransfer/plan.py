"""Transfer plan: the rank-to-rank moves that copy a request's KV between two layouts (no torch).

A source instance of layout ``src`` and a destination instance of layout ``dst`` shard
the same model (``KVShape``) differently: each rank holds its pipeline stage's layers
and its TP rank's KV heads (``KVLayout.layers_of`` / ``kv_heads_of``). Every source
rank's share is a rectangle *layers x kv_heads*; ranks with the same rectangle
(heads replicated when tp > num_kv_heads, or the width/tp TP replicas of a stage when
width > tp) are interchangeable **candidates** for it.

For each destination rank ``d`` (its own rectangle: what it must hold) and each
distinct source rectangle that overlaps it, the plan has one ``Move`` carrying the
overlap (a contiguous range of layers times a contiguous range of heads, global
indices) for all the blocks. The source rank is picked among that rectangle's
candidates round-robin in destination-rank order, so replicas share the sending: the
replicas of one holding serve counts that differ by at most one (with a plain
``dst_rank % replicas`` two dst stages could land on the same replica). Consequences:

- every destination rank receives each (layer, head) it holds exactly once, for every
  block, and nothing else: the source rectangles of distinct holdings partition
  (layers x heads), so the overlaps partition the destination's rectangle;
- one (src_rank, dst_rank) pair has at most one move (a source rank holds a single
  rectangle), and a destination rank gets as few moves as possible: one per source
  holding it overlaps, which no choice of replicas can lower;
- destination replicas (heads replicated on dst, or width > tp) each receive their
  own copy: the plan fills every destination rank, not every distinct holding.

Moves are sorted by (dst_rank, src_rank, first layer); the plan is deterministic. The
rank-level part (everything but the block ids) is cached per pair of layouts, since a
deployment plans every request between the same few layouts.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import lru_cache

from kvtransfer.layout import KVLayout, KVShape, Move


def plan_transfer(
    src: KVLayout,
    dst: KVLayout,
    shape: KVShape,
    src_blocks: Sequence[int],
    dst_blocks: Sequence[int],
) -> list[Move]:
    """The moves that copy blocks ``src_blocks`` of the ``src`` instance into blocks
    ``dst_blocks`` (same length, same order) of the ``dst`` instance.

    ValueError naming the bad value when a layout does not shard ``shape``, the block
    lists differ in length, a block id is not a non-negative integer, or
    ``dst_blocks`` repeats an id (``src_blocks`` may: one block copied twice). Empty
    block lists give ``[]``.
    """
    _check_layout("src", src, shape)
    _check_layout("dst", dst, shape)
    src_ids, dst_ids = _check_blocks(src_blocks, dst_blocks)
    if not src_ids:
        return []
    return [
        Move(src_rank, dst_rank, layers, heads, src_ids, dst_ids)
        for src_rank, dst_rank, layers, heads in _rank_pairs(
            _hashable(src), _hashable(dst), shape.num_layers, shape.num_kv_heads
        )
    ]


def moves_from(plan: Iterable[Move], src_rank: int) -> list[Move]:
    """The moves of ``plan`` that source rank ``src_rank`` sends, in plan order."""
    return [m for m in plan if m.src_rank == src_rank]


def moves_to(plan: Iterable[Move], dst_rank: int) -> list[Move]:
    """The moves of ``plan`` that destination rank ``dst_rank`` receives, in plan order."""
    return [m for m in plan if m.dst_rank == dst_rank]


def plan_bytes(plan: Iterable[Move], shape: KVShape) -> int:
    """Total K plus V bytes ``plan`` moves (all ranks together)."""
    return sum(m.num_bytes(shape) for m in plan)


def _check_layout(name: str, layout: KVLayout, shape: KVShape) -> None:
    """ValueError naming ``name`` and ``layout`` unless it shards ``shape``."""
    try:
        layout.check_shape(shape)
    except ValueError as exc:
        raise ValueError(f"{name} layout {layout} does not shard {shape}: {exc}") from exc


def _check_blocks(
    src_blocks: Sequence[int], dst_blocks: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Both block lists as tuples of ints, validated (see ``plan_transfer``)."""
    src_ids = _block_ids("src_blocks", src_blocks)
    dst_ids = _block_ids("dst_blocks", dst_blocks)
    if len(src_ids) != len(dst_ids):
        raise ValueError(
            f"src_blocks ({len(src_ids)} ids) and dst_blocks ({len(dst_ids)} ids) "
            "must have the same length"
        )
    seen: set[int] = set()
    for block in dst_ids:
        if block in seen:
            raise ValueError(f"dst_blocks repeats block id {block}: {dst_ids}")
        seen.add(block)
    return src_ids, dst_ids


def _block_ids(name: str, blocks: Sequence[int]) -> tuple[int, ...]:
    """``blocks`` as a tuple of non-negative Python ints; ValueError naming the bad id."""
    if isinstance(blocks, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of block ids, got {blocks!r}")
    ids: list[int] = []
    for block in blocks:
        if isinstance(block, bool):
            raise ValueError(f"{name} holds {block!r}, not an integer block id")
        try:
            value = operator.index(block)
        except TypeError:
            raise ValueError(f"{name} holds {block!r}, not an integer block id") from None
        if value < 0:
            raise ValueError(f"{name} holds a negative block id {value}")
        ids.append(value)
    return tuple(ids)


def _hashable(layout: KVLayout) -> KVLayout:
    """``layout`` with its pp_boundaries as a tuple (KVLayout accepts any sequence, and a
    list would make it unhashable, unusable as a cache key)."""
    bounds = layout.pp_boundaries
    if bounds is None or isinstance(bounds, tuple):
        return layout
    return replace(layout, pp_boundaries=tuple(bounds))


@lru_cache(maxsize=256)
def _rank_pairs(
    src: KVLayout, dst: KVLayout, num_layers: int, num_kv_heads: int
) -> tuple[tuple[int, int, range, range], ...]:
    """The plan without its blocks: (src_rank, dst_rank, layers, kv_heads) per move,
    sorted. Cached: a deployment plans every request between the same few layouts."""
    holdings = _holdings(_shares(src, num_layers, num_kv_heads))
    turns = [0] * len(holdings)
    pairs: list[tuple[int, int, range, range]] = []
    for d, (layers, heads) in enumerate(_shares(dst, num_layers, num_kv_heads)):
        for i, (src_layers, src_heads, candidates) in enumerate(holdings):
            common_layers = _overlap(layers, src_layers)
            common_heads = _overlap(heads, src_heads) if common_layers else common_layers
            if not common_heads:
                continue
            rank = candidates[turns[i] % len(candidates)]  # round-robin over replicas
            turns[i] += 1
            pairs.append((rank, d, common_layers, common_heads))
    pairs.sort(key=lambda p: (p[1], p[0], p[2].start))
    return tuple(pairs)


@lru_cache(maxsize=256)
def _shares(
    layout: KVLayout, num_layers: int, num_kv_heads: int
) -> tuple[tuple[range, range], ...]:
    """Each rank's (layers, kv_heads) share, by rank."""
    return tuple(
        (layout.layers_of(rank, num_layers), layout.kv_heads_of(rank, num_kv_heads))
        for rank in range(layout.world_size)
    )


def _holdings(shares: Sequence[tuple[range, range]]) -> list[tuple[range, range, list[int]]]:
    """Each distinct (layers, kv_heads) share with the ranks (ascending) that hold it,
    in order of first holder."""
    by_share: dict[tuple[range, range], list[int]] = {}
    for rank, share in enumerate(shares):
        by_share.setdefault(share, []).append(rank)
    return [(layers, heads, ranks) for (layers, heads), ranks in by_share.items()]


def _overlap(a: range, b: range) -> range:
    """The common part of two step-1 ranges (empty when disjoint)."""
    start = max(a.start, b.start)
    return range(start, max(start, min(a.stop, b.stop)))
