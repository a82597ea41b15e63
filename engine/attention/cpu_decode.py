"""Decode attention on the CPU through a small C kernel (``paged_decode.c``).

The torch reference gathers every sequence's K/V blocks into a new tensor, then runs
SDPA on it: at batch 32 on this project's 2-core machine that is ~1.6 ms per layer for
~11 MB of K/V. The kernel reads the keys in place from the paged cache, block by block
(~1 ms). It is built on first use (``engine.native``).

It serves fp32 caches on the CPU. Everything else, or a machine without a compiler, or
``PDSERVE_CPU_KERNELS=0`` in the environment, falls back to
``reference.decode_attention`` (same contract, same validation).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from engine import gemv, native, single_row
from engine.attention import reference
from engine.attention.reference import DecodePlan

SOURCE = Path(__file__).with_name("paged_decode.c")
# Batches of at least this many keys in all are split over the rank's torch threads
# (a hand-off to a pool thread costs ~0.1 ms here: 8 x 170 keys ran slower split).
SPLIT_KEYS = 4096
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be (see ``engine.native.load``)."""
    lib = native.load(SOURCE)
    if lib is not None:
        lib.paged_decode.restype = ctypes.c_int
        lib.paged_decode.argtypes = [_PTR] * 6 + [_I64] * 8 + [ctypes.c_float]
    return lib


@functools.cache
def _helpers(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="pd-attn")


def _eligible(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    tensors = (q, k_cache, v_cache)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    plan: DecodePlan | None = None,
) -> torch.Tensor:
    """``reference.decode_attention``'s contract; fp32 CPU caches go through the kernel
    (``plan``, when given, is only checked: the kernel reads the tables itself)."""
    lib = library()
    if lib is None or not _eligible(q, k_cache, v_cache):
        return reference.decode_attention(
            q, k_cache, v_cache, context_lens, block_tables, scale, plan
        )
    nb, bs, kvh, d = reference.validate_cache(k_cache, v_cache)
    group = reference.validate_query(q, k_cache)
    batch = q.shape[0]
    if plan is None:  # validates the tables and the lengths against them
        plan = reference.plan_decode(context_lens, block_tables, k_cache)
    reference.check_plan(plan, batch, nb, bs)
    q = q.contiguous()  # the kernel reads [B, heads * d] rows
    out = torch.empty(q.shape, dtype=q.dtype)
    ctx = context_lens.to(torch.int32).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    ptrs = [t.data_ptr() for t in (q, k_cache, v_cache, out, ctx, tables)]

    def run(b0: int, b1: int) -> int:
        shape = (tables.stride(0), b0, b1, kvh, group, d, bs, nb)
        return int(lib.paged_decode(*ptrs, *shape, ctypes.c_float(scale)))

    threads = torch.get_num_threads()
    pool = single_row.library() if gemv.active() else None
    if pool is not None:  # a few-row step: the sequences split over the library's pool
        shape = (tables.stride(0), batch, kvh, group, d, bs, nb)
        codes = [int(pool.paged_decode_pool(*ptrs, *shape, ctypes.c_float(scale)))]
    elif batch * plan.num_keys < SPLIT_KEYS or threads == 1:
        codes = [run(0, batch)]
    else:  # ctypes lets go of the GIL: the chunks run in parallel
        first, *rest = itertools.pairwise(batch * i // threads for i in range(threads + 1))
        helpers = [_helpers(threads - 1).submit(run, a, b) for a, b in rest]
        codes = [run(*first), *(f.result() for f in helpers)]
    if any(codes):
        raise ValueError("block_tables name a block outside the cache")
    return out
