"""Block-row copies by memmove between two CPU caches (the ``local`` transport's
direct path, ``arena_copy.copy_move``).

A CPU cache part that holds all of a layer's local KV heads keeps each block as one
contiguous row of bytes. A copy of blocks from one such cache into another is then one
memmove per run of blocks that are consecutive on both sides: one pass over the bytes,
where torch has no indexed copy between two indexed tensors and needs a staging copy
(a gather, then a scatter). Measured here between two caches (``small`` preset rows of
16 KiB, fp32, random blocks, runs interleaved): 6-15% faster than the staged copy from
512 to 8k tokens. One-sided gathers and scatters stay on torch's index kernels, which
measured faster than a memmove per row. A whole move goes to a C kernel
(``copy_rows.c``) in one call, block lists included: one ctypes call per row cost ~1 us
each, 0.5 ms of a 512-token transfer's ~3 ms, and grouping the runs in Python and numpy
another ~30 us (several times that on a core just woken from idle). From 1 MiB up the
kernel shares the copy between two threads and writes with non-temporal stores."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from engine import native

# Threads of a big copy (see copy_rows.c): two measured best on a 2-core machine.
COPY_THREADS = min(2, os.cpu_count() or 1)


def row_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """Rows ``src[i] -> dst[i]`` as ``(src_row, dst_row, count)`` runs of rows
    consecutive on both sides."""
    runs: list[list[int]] = []
    for a, b in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == a and runs[-1][1] + runs[-1][2] == b:
            runs[-1][2] += 1
        else:
            runs.append([a, b, 1])
    return [(a, b, n) for a, b, n in runs]


def rows_match(src: Tensor, dst: Tensor) -> bool:
    """Whether :func:`copy_runs` applies: both on the CPU, contiguous, with rows (all
    but the first axis) of the same shape and dtype."""
    return (
        src.device.type == dst.device.type == "cpu"
        and src.is_contiguous()
        and dst.is_contiguous()
        and src.dtype == dst.dtype
        and src.shape[1:] == dst.shape[1:]
    )


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    lib = native.load(Path(__file__).with_name("copy_rows.c"))
    if lib is not None:
        lib.copy_blocks.restype = ctypes.c_int
        lib.copy_blocks.argtypes = [
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int,
        ]  # fmt: skip
    return lib


class RowCopy:
    """Row copies between fixed ``(src, dst)`` tensor pairs, checked once (a transfer
    path reuses one per cache pair and only :meth:`run` s new rows): ValueError when a
    pair does not :func:`rows_match`."""

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]):
        for src, dst in pairs:
            if not rows_match(src, dst):
                raise ValueError(
                    f"row copy needs contiguous CPU tensors with equal rows, got "
                    f"{tuple(src.shape)} {src.dtype} and {tuple(dst.shape)} {dst.dtype}"
                )
        self.pairs = list(pairs)  # held: the addresses below point into them
        # [pairs, 3]: src address, dst address, row bytes
        self.sides = np.array(
            [(s.data_ptr(), d.data_ptr(), s[0].numel() * s.element_size()) for s, d in pairs],
            dtype=np.int64,
        ).reshape(len(self.pairs), 3)
        self.rows = (
            min((s.shape[0] for s, _ in pairs), default=0),
            min((d.shape[0] for _, d in pairs), default=0),
        )

    def run(self, src_rows: Sequence[int], dst_rows: Sequence[int]) -> None:
        """Copies row ``src_rows[i]`` to row ``dst_rows[i]`` for each ``i``, for each pair.
        ValueError when a row is negative or past a tensor's end (checked before any
        byte moves: the copy is raw memory). The C kernel (``engine.native``) groups
        rows consecutive on both sides and copies all pairs in one call; where it is not
        built, one ``ctypes.memmove`` per run of rows."""
        if len(src_rows) != len(dst_rows):
            raise ValueError(f"{len(src_rows)} source rows for {len(dst_rows)} destination rows")
        if not self.pairs or not src_rows:
            return
        sides = (("source", src_rows, self.rows[0]), ("destination", dst_rows, self.rows[1]))
        for side, rows, limit in sides:
            if min(rows) < 0 or max(rows) >= limit:
                raise ValueError(
                    f"{side} rows {min(rows)}..{max(rows)} outside the tensors' {limit} rows"
                )
        lib = _kernel()
        if lib is None:
            for a, b, n in row_runs(src_rows, dst_rows):
                for s, d, row in self.sides.tolist():
                    ctypes.memmove(d + b * row, s + a * row, n * row)
            return
        src, dst = (np.asarray(r, dtype=np.int64) for r in (src_rows, dst_rows))
        n, at = src.size, self.sides.ctypes.data
        if lib.copy_blocks(len(self.pairs), at, n, src.ctypes.data, dst.ctypes.data, COPY_THREADS):
            raise MemoryError(f"row copy of {src.size} rows x {len(self.pairs)} pairs")


def copy_runs(
    pairs: Sequence[tuple[Tensor, Tensor]], src_rows: Sequence[int], dst_rows: Sequence[int]
) -> None:
    """:meth:`RowCopy.run` of ``src_rows -> dst_rows`` over ``pairs``, checked as there."""
    RowCopy(pairs).run(src_rows, dst_rows)
