"""Transfer plans: exhaustive simulation over small layouts, exact plans, validation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import pytest

from kvtransfer.layout import KVLayout, KVShape, Move
from kvtransfer.plan import moves_from, moves_to, plan_bytes, plan_transfer

SHAPE = KVShape(num_layers=4, num_kv_heads=2, head_dim=8, block_size=16)
SRC_BLOCKS = (3, 0)
DST_BLOCKS = (1, 5)

# pp_boundaries variations per (num_layers, pp), None = balanced.
BOUNDARIES: dict[tuple[int, int], list[tuple[int, ...] | None]] = {
    (4, 1): [None],
    (4, 2): [None, (1,), (3,)],
    (4, 3): [None, (1, 3)],
    (6, 1): [None],
    (6, 2): [None, (1,), (5,)],
    (6, 3): [None, (1, 5), (3, 4)],
}


def _layouts(shape: KVShape) -> list[KVLayout]:
    """Every small layout that shards ``shape``: tp in {1,2,4,8}, pp in {1,2,3} with
    boundary variations, and width = 2*tp replicas for tp <= 2 at balanced boundaries."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 3):
            for bounds in BOUNDARIES[(shape.num_layers, pp)]:
                widths = [None, 2 * tp] if tp <= 2 and bounds is None else [None]
                for width in widths:
                    layout = KVLayout(tp=tp, pp=pp, pp_boundaries=bounds, width=width)
                    try:
                        layout.check_shape(shape)
                    except ValueError:
                        continue
                    out.append(layout)
    return out


def _truth(layer: int, head: int, block: int) -> int:
    """The value one (layer, head, block) holds on the source instance."""
    return (layer * 100 + head) * 100 + block


@cache
def _share(layout: KVLayout, rank: int, shape: KVShape) -> tuple[range, range]:
    return (
        layout.layers_of(rank, shape.num_layers),
        layout.kv_heads_of(rank, shape.num_kv_heads),
    )


@cache
def _source_caches(
    src: KVLayout, shape: KVShape, src_blocks: tuple[int, ...]
) -> tuple[dict[tuple[int, int, int], int], ...]:
    """Each source rank's simulated cache: {(layer, head, block): value} for its share."""
    caches = []
    for r in range(src.world_size):
        layers, heads = _share(src, r, shape)
        caches.append(
            {(ly, h, b): _truth(ly, h, b) for ly in layers for h in heads for b in src_blocks}
        )
    return tuple(caches)


@cache
def _wanted(
    dst: KVLayout, shape: KVShape, src_blocks: tuple[int, ...], dst_blocks: tuple[int, ...]
) -> tuple[dict[tuple[int, int, int], int], ...]:
    """What each destination rank must hold after the transfer."""
    wanted = []
    for d in range(dst.world_size):
        layers, heads = _share(dst, d, shape)
        pairs = list(zip(src_blocks, dst_blocks, strict=True))
        wanted.append(
            {(ly, h, db): _truth(ly, h, sb) for ly in layers for h in heads for sb, db in pairs}
        )
    return tuple(wanted)


def _simulate(
    src: KVLayout,
    dst: KVLayout,
    shape: KVShape,
    src_blocks: Sequence[int],
    dst_blocks: Sequence[int],
    plan: list[Move],
) -> None:
    """Apply ``plan`` to simulated caches and check every destination rank ends up with
    exactly its share, each item written once, from a source rank that held it."""
    src_cache = _source_caches(src, shape, tuple(src_blocks))
    dst_cache: list[dict[tuple[int, int, int], int]] = [{} for _ in range(dst.world_size)]
    for m in plan:
        assert 0 <= m.src_rank < src.world_size and 0 <= m.dst_rank < dst.world_size
        assert m.src_blocks == tuple(src_blocks) and m.dst_blocks == tuple(dst_blocks)
        held, out = src_cache[m.src_rank], dst_cache[m.dst_rank]
        for ly in m.layers:
            for h in m.kv_heads:
                for sb, db in zip(m.src_blocks, m.dst_blocks, strict=True):
                    assert (ly, h, sb) in held, (m, ly, h, sb)
                    assert (ly, h, db) not in out, (m, ly, h, db)
                    out[(ly, h, db)] = held[(ly, h, sb)]
    assert dst_cache == list(_wanted(dst, shape, tuple(src_blocks), tuple(dst_blocks)))


@cache
def _holders(src: KVLayout, shape: KVShape) -> dict[tuple[range, range], list[int]]:
    """Source ranks grouped by the (layers, kv_heads) share they hold."""
    holders: dict[tuple[range, range], list[int]] = {}
    for r in range(src.world_size):
        holders.setdefault(_share(src, r, shape), []).append(r)
    return holders


@cache
def _min_moves(src: KVLayout, shape: KVShape, layers: range, heads: range) -> int:
    """How many distinct source shares overlap a destination share: the fewest moves
    that can fill it."""
    return sum(
        1
        for lys, hs in _holders(src, shape)
        if lys.start < layers.stop and layers.start < lys.stop
        if hs.start < heads.stop and heads.start < hs.stop
    )


def _check_structure(src: KVLayout, dst: KVLayout, shape: KVShape, plan: list[Move]) -> None:
    """Order, coarseness (one move per pair, minimal moves per dst rank), spreading over
    replicas, and byte count."""
    assert plan == sorted(plan, key=lambda m: (m.dst_rank, m.src_rank, m.layers.start))
    assert len({(m.src_rank, m.dst_rank) for m in plan}) == len(plan)
    need_bytes = 0
    for d in range(dst.world_size):
        layers, heads = _share(dst, d, shape)
        assert len(moves_to(plan, d)) == _min_moves(src, shape, layers, heads)
        need_bytes += len(layers) * len(heads) * len(SRC_BLOCKS) * shape.head_block_bytes
    sent = Counter(m.src_rank for m in plan)
    for ranks in _holders(src, shape).values():
        # round-robin: the uses of one holding spread evenly over its replicas
        counts = [sent[r] for r in ranks]
        assert max(counts) - min(counts) <= 1
    assert all(len(moves_from(plan, r)) == n for r, n in sent.items())
    assert plan_bytes(plan, shape) == need_bytes


@pytest.mark.parametrize("num_layers", [4, 6])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
def test_exhaustive_simulation(num_layers: int, num_kv_heads: int) -> None:
    shape = KVShape(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=4, block_size=2)
    layouts = _layouts(shape)
    assert len(layouts) >= 20
    for src in layouts:
        for dst in layouts:
            plan = plan_transfer(src, dst, shape, SRC_BLOCKS, DST_BLOCKS)
            _simulate(src, dst, shape, SRC_BLOCKS, DST_BLOCKS, plan)
            _check_structure(src, dst, shape, plan)


def _mv(src: int, dst: int, layers: range, heads: range) -> Move:
    return Move(src, dst, layers, heads, SRC_BLOCKS, DST_BLOCKS)


L, L01, L23 = range(0, 4), range(0, 2), range(2, 4)
H, H0, H1 = range(0, 2), range(0, 1), range(1, 2)


@pytest.mark.parametrize(
    ("src", "dst", "want"),
    [
        pytest.param(KVLayout(), KVLayout(), [_mv(0, 0, L, H)], id="1->1"),
        pytest.param(KVLayout(tp=2), KVLayout(), [_mv(0, 0, L, H0), _mv(1, 0, L, H1)], id="tp2->1"),
        pytest.param(KVLayout(), KVLayout(tp=2), [_mv(0, 0, L, H0), _mv(0, 1, L, H1)], id="1->tp2"),
        pytest.param(
            KVLayout(tp=2),
            KVLayout(pp=2),
            [_mv(0, 0, L01, H0), _mv(1, 0, L01, H1), _mv(0, 1, L23, H0), _mv(1, 1, L23, H1)],
            id="tp2->pp2",
        ),
        pytest.param(
            KVLayout(pp=2),
            KVLayout(tp=2),
            [_mv(0, 0, L01, H0), _mv(1, 0, L23, H0), _mv(0, 1, L01, H1), _mv(1, 1, L23, H1)],
            id="pp2->tp2",
        ),
        pytest.param(
            KVLayout(pp=2, pp_boundaries=(1,)),
            KVLayout(pp=2, pp_boundaries=(3,)),
            [_mv(0, 0, range(0, 1), H), _mv(1, 0, range(1, 3), H), _mv(1, 1, range(3, 4), H)],
            id="pp2@1->pp2@3",
        ),
        pytest.param(
            # heads replicated 4x on the source: the two dst stages use different replicas
            KVLayout(tp=8),
            KVLayout(pp=2),
            [_mv(0, 0, L01, H0), _mv(4, 0, L01, H1), _mv(1, 1, L23, H0), _mv(5, 1, L23, H1)],
            id="tp8->pp2-spread",
        ),
        pytest.param(
            # each src rank sends once (dst rank % replicas would give src 0 twice)
            KVLayout(tp=4),
            KVLayout(tp=2, pp=2),
            [_mv(0, 0, L01, H0), _mv(2, 1, L01, H1), _mv(1, 2, L23, H0), _mv(3, 3, L23, H1)],
            id="tp4->tp2pp2-spread",
        ),
        pytest.param(
            # width > tp on the source: two identical replicas share the sending
            KVLayout(tp=1, width=2),
            KVLayout(tp=2),
            [_mv(0, 0, L, H0), _mv(1, 1, L, H1)],
            id="width2->tp2",
        ),
        pytest.param(
            # width > tp on the destination: both replicas get their own copy
            KVLayout(tp=2),
            KVLayout(tp=1, width=2),
            [_mv(0, 0, L, H0), _mv(1, 0, L, H1), _mv(0, 1, L, H0), _mv(1, 1, L, H1)],
            id="tp2->width2",
        ),
        pytest.param(
            # heads replicated on the destination (tp 4 > 2 heads): each rank fed once
            KVLayout(tp=2),
            KVLayout(tp=4),
            [_mv(0, 0, L, H0), _mv(0, 1, L, H0), _mv(1, 2, L, H1), _mv(1, 3, L, H1)],
            id="tp2->tp4",
        ),
    ],
)
def test_exact_plans(src: KVLayout, dst: KVLayout, want: list[Move]) -> None:
    plan = plan_transfer(src, dst, SHAPE, SRC_BLOCKS, DST_BLOCKS)
    assert plan == want
    _simulate(src, dst, SHAPE, SRC_BLOCKS, DST_BLOCKS, plan)


def test_deterministic() -> None:
    shape = KVShape(num_layers=6, num_kv_heads=2, head_dim=4, block_size=2)
    for src in _layouts(shape)[::3]:
        for dst in _layouts(shape)[::4]:
            first = plan_transfer(src, dst, shape, SRC_BLOCKS, DST_BLOCKS)
            assert first == plan_transfer(src, dst, shape, list(SRC_BLOCKS), DST_BLOCKS)


def test_tp8_to_tp1_uses_one_source_per_head() -> None:
    """A single dst rank takes each head group once, from the first replica holding it."""
    plan = plan_transfer(KVLayout(tp=8), KVLayout(), SHAPE, SRC_BLOCKS, DST_BLOCKS)
    assert plan == [_mv(0, 0, L, H0), _mv(4, 0, L, H1)]


def test_spread_over_replicated_heads() -> None:
    """src tp=8 with 2 KV heads (4 replicas per head) into dst tp=1 pp=4: the four dst
    stages take each head from four different source ranks."""
    plan = plan_transfer(KVLayout(tp=8), KVLayout(pp=4), SHAPE, SRC_BLOCKS, DST_BLOCKS)
    for heads, replicas in ((H0, {0, 1, 2, 3}), (H1, {4, 5, 6, 7})):
        senders = [m.src_rank for m in plan if m.kv_heads == heads]
        assert sorted(senders) == sorted(replicas)
    assert [len(moves_from(plan, r)) for r in range(8)] == [1] * 8


def test_helpers_and_bytes() -> None:
    plan = plan_transfer(KVLayout(tp=2), KVLayout(pp=2), SHAPE, SRC_BLOCKS, DST_BLOCKS)
    assert moves_from(plan, 0) == [_mv(0, 0, L01, H0), _mv(0, 1, L23, H0)]
    assert moves_from(plan, 2) == []
    assert moves_to(plan, 1) == [_mv(0, 1, L23, H0), _mv(1, 1, L23, H1)]
    # 4 layers x 2 heads x 2 blocks x (K+V x 16 tokens x 8 dims x 4 bytes)
    assert plan_bytes(plan, SHAPE) == 4 * 2 * 2 * 2 * 16 * 8 * 4
    assert plan_bytes([], SHAPE) == 0


def test_blocks_accepted() -> None:
    assert plan_transfer(KVLayout(tp=2), KVLayout(pp=2), SHAPE, [], []) == []
    # numpy ints are fine and come back as Python ints
    ids: Any = np.array([4, 2]), np.array([0, 1])
    plan = plan_transfer(KVLayout(), KVLayout(), SHAPE, *ids)
    assert plan == [Move(0, 0, L, H, (4, 2), (0, 1))]
    assert all(type(b) is int for b in plan[0].src_blocks + plan[0].dst_blocks)
    # boundaries given as a list (KVLayout accepts it, but it is unhashable)
    listed = KVLayout(pp=2, pp_boundaries=[1])  # type: ignore[arg-type]
    tupled = KVLayout(pp=2, pp_boundaries=(1,))
    assert plan_transfer(listed, listed, SHAPE, [0], [1]) == plan_transfer(
        tupled, tupled, SHAPE, [0], [1]
    )
    # a source block may be copied twice (into two different destination blocks)
    plan = plan_transfer(KVLayout(tp=2), KVLayout(), SHAPE, [6, 6], [1, 2])
    _simulate(KVLayout(tp=2), KVLayout(), SHAPE, [6, 6], [1, 2], plan)


@pytest.mark.parametrize(
    ("src", "dst", "src_blocks", "dst_blocks", "match"),
    [
        (KVLayout(), KVLayout(), [0, 1], [0], r"src_blocks \(2 ids\).*dst_blocks \(1 ids\)"),
        (KVLayout(), KVLayout(), [], [3], r"same length"),
        (KVLayout(), KVLayout(), [0, -1], [0, 1], r"src_blocks holds a negative block id -1"),
        (KVLayout(), KVLayout(), [0, 1], [-5, 1], r"dst_blocks holds a negative block id -5"),
        (KVLayout(), KVLayout(), [0, 1, 2], [4, 2, 4], r"dst_blocks repeats block id 4"),
        (KVLayout(), KVLayout(), [0, 1.5], [0, 1], r"src_blocks holds 1\.5, not an integer"),
        (KVLayout(), KVLayout(), [True], [0], r"src_blocks holds True, not an integer"),
        (KVLayout(), KVLayout(), [0], [None], r"dst_blocks holds None, not an integer"),
        (KVLayout(), KVLayout(), "01", [0, 1], r"src_blocks must be a sequence of block ids"),
        (KVLayout(), KVLayout(), np.zeros((1, 2), dtype=int), [0], r"src_blocks holds array"),
        (KVLayout(), KVLayout(), np.array([0.0]), [0], r"src_blocks holds .*0\.0"),
        (KVLayout(tp=3), KVLayout(), [0], [0], r"src layout .*tp=3.*num_kv_heads=2"),
        (KVLayout(), KVLayout(pp=5), [0], [0], r"dst layout .*pp=5.*between 1 and"),
        (KVLayout(), KVLayout(pp=2, pp_boundaries=(4,)), [], [], r"dst layout .*\(4,\)"),
    ],
)
def test_validation(
    src: KVLayout,
    dst: KVLayout,
    src_blocks: Sequence[int],
    dst_blocks: Sequence[int],
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        plan_transfer(src, dst, SHAPE, src_blocks, dst_blocks)
