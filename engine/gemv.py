"""Few-row linear layers (small-batch decode on a CPU): through the C library of
``engine.single_row`` where it is built (steps of up to ``MAX_ROWS`` rows; batch-1
steps with whole decoder layers fused: ``engine.fused_stack``), else, for one row,
through numpy's OpenBLAS GEMV, as follows.

Measured on this project's 2-core AVX2 machine, medium preset: torch's (MKL's) fp32
GEMV streams the weights at 14-17 GB/s, OpenBLAS's at 24-28 GB/s on two threads, so a
batch-1 decode step drops from 39-47 ms to 31-33 ms. Two thread pools on two cores slow
each other 2-3x, though: OpenBLAS's workers spin ~100 ms after each call unless
``OPENBLAS_THREAD_TIMEOUT`` was set before numpy loaded OpenBLAS, and torch's OpenMP
workers spin after each parallel region. So the path is taken only

- where numpy's BLAS is OpenBLAS and the layer computes in fp32 on the CPU,
- with one thread, or with ``OPENBLAS_THREAD_TIMEOUT`` in the environment (pdserve's
  command line and its Ray workers set it: :data:`BLAS_ENV`),
- inside :meth:`SingleRowGemv.step`, which runs torch's own ops on one thread meanwhile.

Outside a step every call is ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from engine import single_row

# Set before numpy loads (process start): OpenBLAS's workers spin 2**20 cycles (~0.35
# ms) after a call instead of 2**28 (~100 ms) on a core torch needs. Long enough to
# bridge the gaps between a step's GEMVs (with 2**4 each GEMV woke its workers from
# sleep: small's batch-1 step ran 10-15% slower, interleaved runs here).
BLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "20"}

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("single_row_gemv", default=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; inside :meth:`SingleRowGemv.step`, fp32 CPU rows go through the C
    library's GEMV/GEMM, or a single row through OpenBLAS's GEMV (same result within
    fp32 rounding)."""
    if not (_ACTIVE.get() and x.dim() == 2):
        return F.linear(x, weight, bias)
    if (out := single_row.linear(x, weight, bias)) is not None:
        return out
    if x.shape[0] != 1 or not single_row.fp32_cpu(x, weight, bias):
        return F.linear(x, weight, bias)
    # Numpy indexing, not torch's: each torch op here costs as much as a small GEMV.
    out = torch.from_numpy(np.dot(_weight_array(weight), x.numpy()[0])[None])
    return out if bias is None else out.add_(bias)


def active() -> bool:
    """Whether the caller runs inside :meth:`SingleRowGemv.step` with the path on."""
    return _ACTIVE.get()


def _weight_array(weight: torch.Tensor) -> np.ndarray:
    """``weight.numpy()``, kept on the tensor (four torch calls saved per GEMV), and
    made again when the tensor's storage changed (``param.data = ...``)."""
    cached: tuple[int, np.ndarray] | None = getattr(weight, "_gemv_array", None)
    ptr = weight.data_ptr()
    if cached is None or cached[0] != ptr or cached[1].shape != weight.shape:
        cached = (ptr, weight.numpy())
        weight._gemv_array = cached  # type: ignore[attr-defined]
    return cached[1]


@functools.cache
def _openblas() -> Any | None:
    """threadpoolctl's handle on numpy's OpenBLAS, or None (another BLAS, no
    threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    libs = ThreadpoolController().select(internal_api="openblas")
    mine = [lib for lib in libs.lib_controllers if lib.filepath.startswith(numpy_dir)]
    return mine[0] if mine else None


class SingleRowGemv:
    """Switches one rank's steps of up to ``max_rows`` rows to the C library's
    GEMV/GEMM and fused layers (``engine.single_row``), else single-row steps to
    OpenBLAS's GEMV where that is safe (see the module docstring); ``threads`` is the
    rank's torch thread count."""

    def __init__(self, threads: int, device: torch.device, max_rows: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if not 1 <= max_rows <= single_row.MAX_ROWS:
            raise ValueError(f"max_rows must be in [1, {single_row.MAX_ROWS}], got {max_rows}")
        self.threads, self.max_rows = threads, max_rows
        cpu = device.type == "cpu"
        self.native = cpu and single_row.start(threads)
        self.blas = _openblas() if cpu and not self.native else None
        quiet = threads == 1 or bool(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
        self.enabled = self.native or (self.blas is not None and quiet)

    @contextlib.contextmanager
    def step(self, num_rows: int) -> Iterator[None]:
        """Runs the body (one forward of ``num_rows`` token rows) with the few-row
        path on when it applies: torch on one thread, the library's pool (or
        OpenBLAS, one row only) on ``threads``."""
        rows = self.max_rows if self.native else 1
        if not (self.enabled and 1 <= num_rows <= rows):
            yield
            return
        if self.blas is not None:
            self.blas.set_num_threads(self.threads)
        torch.set_num_threads(1)
        token = _ACTIVE.set(True)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            torch.set_num_threads(self.threads)
