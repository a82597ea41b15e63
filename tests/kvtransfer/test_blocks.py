"""Gather/scatter of KV blocks on one worker (kvtransfer.blocks)."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.blocks import KVView, MoveIO, Piece, gather, gather_into, scatter, split_pieces
from kvtransfer.layout import Move
from kvtransfer.wire import as_bytes, from_bytes


def make_view(
    layers: range, heads: range, blocks: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0
) -> KVView:
    gen = torch.Generator().manual_seed(seed)
    shape = (blocks, 4, len(heads), 3)
    caches = [
        (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
        for _ in layers
    ]
    return KVView(caches, layers, heads)


def move(layers: range, heads: range, src: tuple[int, ...], dst: tuple[int, ...]) -> Move:
    return Move(0, 0, layers, heads, src, dst)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_layout_and_values(dtype: torch.dtype) -> None:
    view = make_view(range(2, 6), range(2, 4), dtype=dtype)  # layers 2-5, heads 2-3
    m = move(range(3, 5), range(3, 4), (5, 1, 6), (0, 1, 2))
    out = gather(view, m)
    assert out.shape == (2, 2, 3, 4, 1, 3) and out.dtype == dtype and out.is_contiguous()
    for li, layer in enumerate(m.layers):
        for part in (0, 1):
            cache = view.caches[layer - 2][part]
            for bi, block in enumerate(m.src_blocks):
                assert torch.equal(out[li, part, bi], cache[block, :, 1:2])


def test_round_trip_between_views_with_head_subsets() -> None:
    src = make_view(range(4), range(0, 2), seed=1)  # heads 0-1 of layers 0-3
    dst = make_view(range(2, 4), range(1, 2), seed=2)  # head 1 of layers 2-3
    before = [(k.clone(), v.clone()) for k, v in dst.caches]
    m = move(range(2, 4), range(1, 2), (0, 3, 7), (6, 2, 4))
    scatter(dst, m, gather(src, m))
    for li, layer in enumerate(m.layers):
        for part in (0, 1):
            got, want = dst.caches[li][part], src.caches[layer][part]
            for s, d in zip(m.src_blocks, m.dst_blocks, strict=True):
                assert torch.equal(got[d, :, 0], want[s, :, 1])
            untouched = [b for b in range(8) if b not in m.dst_blocks]
            assert torch.equal(got[untouched], before[li][part][untouched])


def test_gather_into_preallocated_buffer() -> None:
    view = make_view(range(2), range(2))
    m = move(range(2), range(2), (1, 2), (1, 2))
    buf = torch.empty(2, 2, 2, 4, 2, 3)
    assert gather_into(view, m, buf) is buf
    assert torch.equal(buf, gather(view, m))
    with pytest.raises(ValueError, match=r"expected \(2, 2, 2, 4, 2, 3\) float32, got"):
        gather_into(view, m, torch.empty(2, 2, 2, 4, 2, 3, dtype=torch.bfloat16))


def test_pieces_cover_moves_and_round_trip() -> None:
    src, dst = make_view(range(3), range(2), seed=3), make_view(range(3), range(2), seed=4)
    m = move(range(3), range(2), (0, 1, 2, 3, 4), (7, 6, 5, 4, 3))
    bb = src.block_bytes(m)  # one block of one layer and part
    # whole layers while they fit (2 layers of K+V of 5 blocks), else runs of blocks
    assert split_pieces([m], [bb], 20 * bb) == [
        Piece(0, range(0, 2), 0, 5),
        Piece(0, range(2, 3), 0, 5),
    ]
    pieces = split_pieces([m], [bb], 4 * bb)
    assert pieces[:3] == [
        Piece(0, range(0, 1), 0, 2),
        Piece(0, range(0, 1), 2, 4),
        Piece(0, range(0, 1), 4, 5),
    ]
    assert len(pieces) == 9
    src_io, dst_io = MoveIO(src, m, "src"), MoveIO(dst, m, "dst")
    for p in pieces:
        buf = torch.empty(src_io.shape(p))
        dst_io.scatter(p, src_io.gather(p, buf))
    back = move(range(3), range(2), (7, 6, 5, 4, 3), (0,) * 5)
    assert torch.equal(gather(dst, back), gather(src, m))
    with pytest.raises(ValueError, match="is outside"):
        src_io.gather(Piece(0, range(2, 4), 0, 5), torch.empty(2, 2, 5, 4, 2, 3))


def test_errors_name_what_is_missing() -> None:
    view = make_view(range(2, 4), range(1, 3))
    with pytest.raises(
        ValueError, match=r"layer 1 is not held here \(this view holds range\(2, 4\)\)"
    ):
        gather(view, move(range(1, 3), range(1, 3), (0,), (0,)))
    with pytest.raises(ValueError, match=r"kv heads range\(0, 2\) are not held"):
        gather(view, move(range(2, 4), range(0, 2), (0,), (0,)))
    with pytest.raises(ValueError, match="block 8 is outside this cache of 8 blocks"):
        gather(view, move(range(2, 4), range(1, 3), (8,), (0,)))
    with pytest.raises(ValueError, match="dst_blocks repeat a block"):
        scatter(view, move(range(2, 3), range(1, 2), (0, 1), (3, 3)), torch.zeros(1, 2, 2, 4, 1, 3))


def test_scatter_checks_shape_and_dtype() -> None:
    view = make_view(range(2), range(2))
    m = move(range(2), range(2), (0, 1), (2, 3))
    good = gather(view, m)
    with pytest.raises(ValueError, match=r"expected \(2, 2, 2, 4, 2, 3\) float32, got .* bfloat16"):
        scatter(view, m, good.to(torch.bfloat16))
    with pytest.raises(
        ValueError, match=r"expected \(2, 2, 2, 4, 2, 3\) float32, got \(2, 2, 1, 4, 2, 3\)"
    ):
        scatter(view, m, good[:, :, :1])


def test_view_validates_caches() -> None:
    k = torch.zeros(4, 2, 2, 3)
    with pytest.raises(ValueError, match="2 caches for 1 layers"):
        KVView([(k, k), (k, k)], range(1), range(2))
    with pytest.raises(ValueError, match=r"expected \(4, 2, 3, 3\)"):
        KVView([(k, k)], range(1), range(3))


def test_bytes_round_trip_bf16() -> None:
    t = torch.randn(3, 5).to(torch.bfloat16)
    raw = bytes(as_bytes(t))
    assert torch.equal(from_bytes(raw, torch.bfloat16, (3, 5)), t)
    with pytest.raises(ValueError, match="expected 32 bytes, got 30"):
        from_bytes(raw, torch.float32, (2, 4))
