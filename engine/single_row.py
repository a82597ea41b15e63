"""Small-batch decode on the CPU through a small C library (``single_row.c``).

A batch-1 step is memory-bound on the weights, but each of a layer's ~30 torch calls
costs 5-20 us here, ~4 ms of a small model's ~10 ms step. The library does all of a
stage's dense decoder layers in one call (``engine.fused_stack``) and the remaining
single-row linears (the LM head) with the same GEMV. Steps of up to ``MAX_ROWS`` rows
take its few-row GEMM, which reads each weight once for all rows: 1.1-1.5x MKL's sgemm
at 8-32 rows here, 1.6-2.8x at 1-4 (MKL wins from ~48 rows). Everything runs over the
library's own thread pool: the caller's thread plus ``threads - 1`` workers that spin
~0.1 ms between tasks, then sleep. It is built on first use (``engine.native``);
without a compiler, or with ``PDSERVE_CPU_KERNELS=0``, callers keep their
torch/OpenBLAS path.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine import native

if TYPE_CHECKING:
    from engine.forward_batch import ForwardBatch

SOURCE = Path(__file__).with_name("single_row.c")
INCLUDES = (
    Path(__file__).parent / "attention" / "paged_decode.c",
    Path(__file__).with_name("few_rows.c"),
)
SPIN_NS = 100_000
MAX_ROWS = 32  # rows up to which the library's GEMM beats MKL's here (measured, 2 cores)
_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64
# decode_layer's pointer slots and sizes (the enums in single_row.c, in order)
_PTRS = "x res out res_out ln1 wqkv bqkv qn kn cos sin kc vc table wo ln2 wgu wd scratch"
_DIMS = "has_res hidden nh nkv d inter slot ctx nb bs table_len"
P = {name: i for i, name in enumerate(_PTRS.split())}
D = {name: i for i, name in enumerate(_DIMS.split())}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be (see ``engine.native.load``)."""
    lib = native.load(SOURCE, INCLUDES)
    if lib is not None:
        lib.pool_start.restype = ctypes.c_int
        lib.pool_start.argtypes = [ctypes.c_int, _I64]
        lib.gemv.restype = None
        lib.gemv.argtypes = [_PTR] * 4 + [_I64] * 2
        lib.gemm.restype = None
        lib.gemm.argtypes = [_PTR] * 4 + [_I64] * 3
        lib.paged_decode_pool.restype = ctypes.c_int
        lib.paged_decode_pool.argtypes = [_PTR] * 6 + [_I64] * 7 + [ctypes.c_float]
        lib.add_rms_norm.restype = None
        lib.add_rms_norm.argtypes = [_PTR] * 5 + [_I64, ctypes.c_float]
        lib.decode_layers.restype = ctypes.c_int
        lib.decode_layers.argtypes = [_PTR, _PTR, _I64, ctypes.c_float, ctypes.c_float]
    return lib


def start(threads: int) -> bool:
    """Starts the library's pool with ``threads`` threads (the first call in a process
    decides); whether the library is there."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    lib = library()
    if lib is None:
        return False
    lib.pool_start(threads, SPIN_NS)
    return True


def fp32_cpu(*tensors: torch.Tensor | None) -> bool:
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
        for t in tensors
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear`` of 1 to ``MAX_ROWS`` fp32 CPU rows by the library's GEMV (one row)
    or GEMM; None where it does not apply (no library, another dtype or device,
    non-contiguous operands, more rows)."""
    lib = library()
    if lib is None or x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        return None
    if not fp32_cpu(x, weight, bias) or x.shape[1] != weight.shape[1]:
        return None
    rows, (n, k) = x.shape[0], weight.shape
    out = torch.empty((rows, n), dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    if rows == 1:
        lib.gemv(weight.data_ptr(), x.data_ptr(), b, out.data_ptr(), n, k)
    else:
        lib.gemm(weight.data_ptr(), x.data_ptr(), b, out.data_ptr(), rows, n, k)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rms_norm(x + residual) * weight, x + residual)`` of one fp32 CPU row in one C
    call (torch's ``rms_norm`` alone costs ~40 us here); None where it does not apply."""
    lib = library()
    n = weight.shape[0]
    if lib is None or x.shape != (1, n) or not fp32_cpu(x, residual, weight):
        return None
    if residual is not None and residual.shape != x.shape:
        return None
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    res = None if residual is None else residual.data_ptr()
    lib.add_rms_norm(
        x.data_ptr(), res, weight.data_ptr(), out.data_ptr(), res_out.data_ptr(), n, eps
    )
    return out, res_out


@dataclass(frozen=True)
class StepInputs:
    """What every layer of a batch-1 decode step shares: the new token's cache slot,
    its context length (keys, itself included), its block table and its position."""

    slot: int
    ctx: int
    table: torch.Tensor
    position: int


def step_inputs(batch: ForwardBatch) -> StepInputs | None:
    """The step's :class:`StepInputs`, or None unless it is one decode token."""
    if batch.num_tokens != 1 or batch.num_prefill_tokens != 0:
        return None
    table = batch.decode_block_tables[0]
    if table.dtype != torch.int32 or not table.is_contiguous():
        table = table.to(torch.int32).contiguous()
    slot, ctx = int(batch.slot_mapping[0]), int(batch.decode_context_lens[0])
    return StepInputs(slot, ctx, table, int(batch.positions[0]))
