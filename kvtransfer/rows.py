"""Block-row copies by memmove between two CPU caches (the ``local`` transport's
direct path, ``arena_copy.copy_move``).

A CPU cache part that holds all of a layer's local KV heads keeps each block as one
contiguous row of bytes. A copy of blocks from one such cache into another is then one
memmove per run of blocks that are consecutive on both sides: one pass over the bytes,
where torch has no indexed copy between two indexed tensors and needs a staging copy
(a gather, then a scatter). Measured here between two caches (``small`` preset rows of
16 KiB, fp32, random blocks, runs interleaved): 6-15% faster than the staged copy from
512 to 8k tokens. One-sided gathers and scatters stay on torch's index kernels, which
measured faster than a memmove per row. The memmoves of a whole move go to a C kernel
(``copy_rows.c``) in one call: one ctypes call per row cost ~1 us each, 0.5 ms of a
512-token transfer's ~3 ms. From 1 MiB up the kernel splits the copy between two
threads and writes with non-temporal stores."""

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


class RowRuns:
    """Rows ``src[i] -> dst[i]`` as ``(src_row, dst_row, count)`` runs, grouping rows
    consecutive on both sides, with the rows each side needs (for the bounds check)."""

    def __init__(self, src: Sequence[int], dst: Sequence[int]):
        runs: list[list[int]] = []
        for a, b in zip(src, dst, strict=True):
            if a < 0 or b < 0:
                raise ValueError(f"negative row in {a} -> {b}")
            if runs and runs[-1][0] + runs[-1][2] == a and runs[-1][1] + runs[-1][2] == b:
                runs[-1][2] += 1
            else:
                runs.append([a, b, 1])
        self.runs = [(a, b, n) for a, b, n in runs]
        self.src_rows = max((a + n for a, _, n in self.runs), default=0)
        self.dst_rows = max((b + n for _, b, n in self.runs), default=0)


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
        lib.copy_rows.restype = None
        lib.copy_rows.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 3, ctypes.c_int]
    return lib


class RowCopy:
    """Row copies between fixed ``(src, dst)`` tensor pairs, checked once (a transfer
    path reuses one per cache pair and only :meth:`run` s new runs): ValueError when a
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

    def run(self, runs: RowRuns) -> None:
        """Copies rows ``src[a : a + n]`` to ``dst[b : b + n]`` for each run of ``runs``,
        for each pair. ValueError when the runs need more rows than a tensor has
        (checked before any byte moves: the copy is raw memory). All ranges go to the
        C kernel in one call where it is built (``engine.native``), else one
        ``ctypes.memmove`` each."""
        if not self.pairs or not runs.runs:
            return
        if runs.src_rows > self.rows[0] or runs.dst_rows > self.rows[1]:
            raise ValueError(
                f"row runs need {runs.src_rows} source / {runs.dst_rows} destination rows, "
                f"the tensors have {self.rows[0]} / {self.rows[1]}"
            )
        a, b, n = np.array(runs.runs, dtype=np.int64).T
        sides, row = self.sides, self.sides[:, 2:3]
        src_at, dst_at, sizes = sides[:, 0:1] + a * row, sides[:, 1:2] + b * row, n * row
        lib = _kernel()
        if lib is None:
            for d, s, k in zip(dst_at.flat, src_at.flat, sizes.flat, strict=True):
                ctypes.memmove(int(d), int(s), int(k))
            return
        flat = [np.ascontiguousarray(x, dtype=np.int64).ravel() for x in (dst_at, src_at, sizes)]
        lib.copy_rows(flat[0].size, *(x.ctypes.data for x in flat), COPY_THREADS)


def copy_runs(pairs: Sequence[tuple[Tensor, Tensor]], runs: RowRuns) -> None:
    """:meth:`RowCopy.run` of ``runs`` over ``pairs``, checked as there."""
    RowCopy(pairs).run(runs)
