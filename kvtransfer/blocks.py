"""Gather and scatter of KV blocks on one worker (torch).

A worker's KV cache is a list, one entry per local layer, of (K, V) tensors shaped
``(num_blocks, block_size, local_kv_heads, head_dim)``. A :class:`KVView` says which
global layers and KV heads those tensors hold, so that a :class:`~kvtransfer.layout.Move`
(global indices) can be cut out of them (:func:`gather`) or written into them
(:func:`scatter`). A gathered move is one contiguous tensor
``[len(layers), 2, len(blocks), block_size, len(kv_heads), head_dim]`` (axis 1: K, V).

Transports that stream a move cut it into :class:`Piece` s: the K or the V of one layer
over a run of the move's blocks, a contiguous slab of the gathered layout, at most
``max_bytes`` (:func:`split_pieces`); both ends of a transfer cut the same moves the
same way. Every copy is one ``index_select`` / ``index_put_`` over the block axis per
layer and part: no Python loop over blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.kv_arena import KVArena
from kvtransfer.layout import Move

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the names KVShape uses)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVView:
    """One worker's KV cache and the global layers / KV heads it holds; ``arena`` is
    the shared-memory pool the caches live in, when they do (same-host peers can then
    write into them directly)."""

    caches: list[tuple[Tensor, Tensor]]
    layers: range
    kv_heads: range
    arena: KVArena | None = None

    def __post_init__(self) -> None:
        if len(self.caches) != len(self.layers):
            raise ValueError(f"{len(self.caches)} caches for {len(self.layers)} layers")
        if not self.caches:
            raise ValueError("a KV view needs at least one layer")
        ref = self.caches[0][0]
        want = (ref.shape[0], ref.shape[1], len(self.kv_heads), ref.shape[3])
        for i, (k, v) in enumerate(self.caches):
            for t in (k, v):
                if t.dim() != 4 or tuple(t.shape) != want or t.dtype != ref.dtype:
                    raise ValueError(
                        f"cache of local layer {i}: expected {want} {ref.dtype}, "
                        f"got {tuple(t.shape)} {t.dtype}"
                    )

    @property
    def num_blocks(self) -> int:
        return int(self.caches[0][0].shape[0])

    @property
    def block_size(self) -> int:
        return int(self.caches[0][0].shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.caches[0][0].shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.caches[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.caches[0][0].device

    def block_bytes(self, move: Move) -> int:
        """Bytes of one block of one layer and one part (K or V) of ``move``."""
        itemsize = self.caches[0][0].element_size()
        return self.block_size * len(move.kv_heads) * self.head_dim * itemsize

    def move_shape(self, move: Move) -> tuple[int, ...]:
        """Shape of ``move`` gathered: [layers, 2, blocks, block_size, heads, head_dim]."""
        n, heads = len(move.src_blocks), len(move.kv_heads)
        return (len(move.layers), 2, n, self.block_size, heads, self.head_dim)

    def part(self, layer: int, part: int, kv_heads: range) -> Tensor:
        """K (part 0) or V (part 1) of global ``layer``, restricted to global ``kv_heads``;
        ValueError naming what this view lacks."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not held here (this view holds {self.layers})")
        if kv_heads.start not in self.kv_heads or kv_heads[-1] not in self.kv_heads:
            raise ValueError(
                f"kv heads {kv_heads} are not held here (this view holds {self.kv_heads})"
            )
        t = self.caches[layer - self.layers.start][part]
        if len(kv_heads) == len(self.kv_heads):
            return t
        h0 = kv_heads.start - self.kv_heads.start
        return t[:, :, h0 : h0 + len(kv_heads)]


@dataclass(frozen=True)
class Piece:
    """Global ``layers`` (a sub-range of the move's) x K and V x blocks ``[start, stop)``
    (positions in the move's block lists) of move number ``move``: the contiguous slab
    ``[len(layers), 2, stop - start, block_size, heads, head_dim]``."""

    move: int
    layers: range
    start: int
    stop: int


def split_pieces(moves: Sequence[Move], block_bytes: Sequence[int], max_bytes: int) -> list[Piece]:
    """Cuts ``moves`` into pieces of at most ``max_bytes`` (whole layers while one fits,
    else runs of blocks of one layer; at least one block); ``block_bytes[i]`` is what
    one block of one layer and part of move ``i`` weighs."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    out: list[Piece] = []
    for i, (move, nbytes) in enumerate(zip(moves, block_bytes, strict=True)):
        n, layers = len(move.src_blocks), move.layers
        if 2 * n * nbytes <= max_bytes:
            per = max_bytes // (2 * n * nbytes)
            for lo in range(layers.start, layers.stop, per):
                out.append(Piece(i, range(lo, min(lo + per, layers.stop)), 0, n))
            continue
        step = max(1, max_bytes // (2 * nbytes))
        for layer in layers:
            out.extend(
                Piece(i, range(layer, layer + 1), b, min(b + step, n)) for b in range(0, n, step)
            )
    return out


def block_index(blocks: Sequence[int], num_blocks: int, device: torch.device) -> Tensor:
    """``blocks`` as an int64 index tensor; ValueError if one is outside [0, num_blocks)."""
    if blocks and (min(blocks) < 0 or max(blocks) >= num_blocks):
        bad = next(b for b in blocks if not 0 <= b < num_blocks)
        raise ValueError(f"block {bad} is outside this cache of {num_blocks} blocks")
    return torch.tensor(blocks, dtype=torch.int64, device=device)


def _check(tensor: Tensor, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise ValueError(
            f"{what}: expected {shape} {dtype_name(dtype)}, "
            f"got {tuple(tensor.shape)} {dtype_name(tensor.dtype)}"
        )


def _wide(t: Tensor) -> Tensor:
    """The same memory seen as 16- or 8-byte elements when its rows allow: torch's
    indexing kernels move one element at a time, so wide elements copy 3-5x faster."""
    for wide, size in ((torch.complex128, 16), (torch.int64, 8)):
        if t.shape[-1] * t.element_size() % size == 0:
            try:
                return t.view(wide)
            except RuntimeError:  # strides or alignment do not allow it
                continue
    return t


def check_dst_blocks(move: Move) -> None:
    """ValueError when ``move`` writes a destination block twice."""
    if len(set(move.dst_blocks)) != len(move.dst_blocks):
        raise ValueError(f"dst_blocks repeat a block: {move.dst_blocks}")


class MoveIO:
    """One move resolved against one view, checked once: its K and V per layer (only
    the move's heads) and its source (``side="src"``) or destination block index."""

    def __init__(self, view: KVView, move: Move, side: str):
        if side not in ("src", "dst"):
            raise ValueError(f"side must be 'src' or 'dst', got {side!r}")
        blocks = move.src_blocks if side == "src" else move.dst_blocks
        if side == "dst":
            check_dst_blocks(move)
        self.view, self.move, self.blocks = view, move, blocks
        self.index = block_index(blocks, view.num_blocks, view.device)
        self.parts = [
            (_wide(view.part(layer, 0, move.kv_heads)), _wide(view.part(layer, 1, move.kv_heads)))
            for layer in move.layers
        ]
        self._contiguous = view.device.type == "cpu" and all(
            k.is_contiguous() for k, _ in self.parts
        )
        self._rows: list[tuple[np.ndarray, np.ndarray]] | None = None  # made on first use

    def whole(self) -> Piece:
        """The whole move as one piece."""
        return Piece(0, self.move.layers, 0, len(self.move.src_blocks))

    def shape(self, piece: Piece) -> tuple[int, ...]:
        """[layers, 2, blocks, block_size, heads, head_dim] of ``piece``."""
        v = self.view
        heads = len(self.move.kv_heads)
        return (len(piece.layers), 2, piece.stop - piece.start, v.block_size, heads, v.head_dim)

    def nbytes(self, piece: Piece) -> int:
        """Bytes of ``piece``."""
        return 2 * len(piece.layers) * (piece.stop - piece.start) * self.view.block_bytes(self.move)

    def _layers(self, piece: Piece) -> list[tuple[Tensor, Tensor]]:
        lo = piece.layers.start - self.move.layers.start
        if lo < 0 or piece.layers.stop > self.move.layers.stop or piece.stop > len(self.index):
            raise ValueError(f"{piece} is outside {self.move}")
        return self.parts[lo : lo + len(piece.layers)]

    def rows(self, piece: Piece) -> list[memoryview] | None:
        """``piece`` as the list of its blocks' rows in the cache, in slab order (no
        copy: ``b"".join`` of them is the slab), or None when a block's heads are not
        contiguous there (a subset of the local heads, or a CUDA cache)."""
        if not self._contiguous:
            return None
        if self._rows is None:
            self._rows = [(_rows(k), _rows(v)) for k, v in self.parts]
        lo = piece.layers.start - self.move.layers.start
        blocks = self.blocks[piece.start : piece.stop]
        return [
            r[b].data
            for k, v in self._rows[lo : lo + len(piece.layers)]
            for r in (k, v)
            for b in blocks
        ]

    def gather(self, piece: Piece, out: Tensor) -> Tensor:
        """Copies ``piece`` into ``out`` (contiguous, :meth:`shape`, the view's dtype)."""
        _check(out, self.shape(piece), self.view.dtype, "gather buffer")
        idx = self.index[piece.start : piece.stop]
        for li, (k, v) in enumerate(self._layers(piece)):
            torch.index_select(k, 0, idx, out=_wide(out[li, 0]))
            torch.index_select(v, 0, idx, out=_wide(out[li, 1]))
        return out

    def scatter(self, piece: Piece, tensor: Tensor) -> None:
        """Writes ``piece`` from ``tensor`` into the destination blocks; ValueError
        naming expected vs got when its shape or dtype is not the view's."""
        _check(tensor, self.shape(piece), self.view.dtype, "scatter input")
        idx = self.index[piece.start : piece.stop]
        tensor = tensor.contiguous()
        for li, (k, v) in enumerate(self._layers(piece)):
            k.index_copy_(0, idx, _wide(tensor[li, 0]))
            v.index_copy_(0, idx, _wide(tensor[li, 1]))


def _rows(t: Tensor) -> np.ndarray:
    """A contiguous CPU cache as a uint8 [num_blocks, block bytes] numpy view."""
    return t.view(torch.uint8).reshape(t.shape[0], -1).numpy()


def gather_into(view: KVView, move: Move, out: Tensor) -> Tensor:
    """Copies ``move``'s layers, heads and ``src_blocks`` into ``out`` (contiguous,
    :meth:`KVView.move_shape`, the view's dtype) and returns it."""
    io = MoveIO(view, move, "src")
    return io.gather(io.whole(), out)


def gather(view: KVView, move: Move) -> Tensor:
    """``move``'s K and V, contiguous: [layers, 2, blocks, block_size, heads, head_dim]."""
    out = torch.empty(view.move_shape(move), dtype=view.dtype, device=view.device)
    return gather_into(view, move, out)


def scatter(view: KVView, move: Move, tensor: Tensor) -> None:
    """Writes a gathered ``tensor`` of ``move`` into its ``dst_blocks``; ValueError
    naming expected vs got when its shape or dtype is not the view's."""
    io = MoveIO(view, move, "dst")
    io.scatter(io.whole(), tensor)


def slab(buf: Tensor, io: MoveIO, piece: Piece) -> Tensor:
    """``piece``'s shape and dtype over the start of the uint8 buffer ``buf``."""
    return buf[: io.nbytes(piece)].view(io.view.dtype).view(io.shape(piece))
