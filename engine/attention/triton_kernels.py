"""Triton paged-attention kernels and their launch wrappers.

Same contract and cache layout as ``engine.attention.reference``. On CPU the kernels
run only under ``TRITON_INTERPRET=1``, which must be set before this module is
imported (the ``@triton.jit`` decorator reads it).

Precision: the interpreter computes bf16 arithmetic wrongly, so there every load is
cast to fp32 (``UPCAST``); on CUDA fp32 inputs also take the fp32 path (IEEE dot, no
TF32), while bf16/fp16 feed the tensor cores directly with fp32 accumulation.
Softmax always runs in fp32. ``tl.dot`` needs every dimension >= 16, hence the
padded query-group and head-dim tiles. Slot ids and context lengths are not checked
against the cache here (that would cost a device sync per layer): callers own them.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

from engine.attention import reference as _ref

__all__ = ["INTERPRET", "decode_attention", "prefill_attention", "store_kv"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter pays per program and per loop iteration, not per element: big tiles.
_Q_TILE = 64
_STORE_ELEMS = 1 << 16 if INTERPRET else 4096


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
    col = tl.arange(0, BLOCK_HD)
    head = col // HEAD_DIM
    dim = col % HEAD_DIM
    mask = (slot >= 0)[:, None] & (col < NUM_KV_HEADS * HEAD_DIM)[None, :]
    src_k = tok.to(tl.int64)[:, None] * stride_kt + (head * stride_kh + dim)[None, :]
    src_v = tok.to(tl.int64)[:, None] * stride_vt + (head * stride_vh + dim)[None, :]
    dst = (slot // BLOCK_SIZE * stride_cb + slot % BLOCK_SIZE * stride_cs)[:, None] + (
        head * stride_ch + dim
    )[None, :]
    k = tl.load(k_ptr + src_k, mask=mask)
    v = tl.load(v_ptr + src_v, mask=mask)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_tile(cache_ptr, bt_row_ptr, pos, pos_mask, kv_head, offs_d, d_mask,
             stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """Load cache rows for key positions ``pos`` of one sequence through its block table."""
    blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)
    row = blk * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
    return tl.load(
        cache_ptr + row[:, None] + offs_d[None, :],
        mask=pos_mask[:, None] & d_mask[None, :],
        other=0.0,
    )


@triton.jit
def _attend_tile(q, k, v, qk_mask, m_i, l_i, acc, scale, UPCAST: tl.constexpr):
    """One online-softmax step of ``q`` against a tile of keys; returns ``(m, l, acc)``."""
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = tl.where(qk_mask, qk * scale, float("-inf"))
    # Every row sees key 0 in its first tile, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, ctx_ptr, bt_ptr, scale,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_btb,
    stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # One program per (sequence, kv head): the whole GQA group shares each K/V tile.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    io_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=io_mask, other=0.0,
    )  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    for start in range(0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_mask = pos < ctx
        k = _kv_tile(kc_ptr, bt_row, pos, pos_mask, kv_head, offs_d, d_mask,
                     stride_cb, stride_cs, stride_ch, BLOCK_SIZE)  # fmt: skip
        v = _kv_tile(vc_ptr, bt_row, pos, pos_mask, kv_head, offs_d, d_mask,
                     stride_cb, stride_cs, stride_ch, BLOCK_SIZE)  # fmt: skip
        m_i, l_i, acc = _attend_tile(q, k, v, pos_mask[None, :], m_i, l_i, acc, scale, UPCAST)
    # ctx == 0 (batch padding) leaves l_i == 0: write zeros, not NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=io_mask,
    )  # fmt: skip


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, cu_ptr, ctx_ptr, bt_ptr, scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_btb,
    stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    # One program per (query tile, sequence, query head).
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + seq)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    io_mask = m_mask[:, None] & d_mask[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=io_mask, other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
    # Bottom-right aligned causality: query j sits at ctx - q_len + j.
    q_pos = ctx - q_len + offs_m
    kv_end = tl.minimum(ctx - q_len + (tile + 1) * BLOCK_M, ctx)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    kv_head = head // GROUP
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_mask = pos < kv_end
        k = _kv_tile(kc_ptr, bt_row, pos, pos_mask, kv_head, offs_d, d_mask,
                     stride_cb, stride_cs, stride_ch, BLOCK_SIZE)  # fmt: skip
        v = _kv_tile(vc_ptr, bt_row, pos, pos_mask, kv_head, offs_d, d_mask,
                     stride_cb, stride_cs, stride_ch, BLOCK_SIZE)  # fmt: skip
        qk_mask = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _attend_tile(q, k, v, qk_mask, m_i, l_i, acc, scale, UPCAST)
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)  # fmt: skip


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if not INTERPRET:
        raise ValueError(
            f"Triton attention got a {t.device} tensor: it needs CUDA, or "
            "TRITON_INTERPRET=1 set before engine.attention.triton_kernels is imported"
        )


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    # The kernels address K and V with one set of strides and unit head_dim stride.
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(
            f"k_cache/v_cache strides {k_cache.stride()}/{v_cache.stride()} must match "
            "and have a contiguous head_dim"
        )
    return k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)


def _precision(dtype: torch.dtype, head_dim: int) -> tuple[bool, int]:
    """``(UPCAST, BLOCK_N)`` for a cache dtype: fp32 math, and keys per K/V tile."""
    if INTERPRET:
        return True, 128
    # Wide fp32 K/V tiles (x pipeline stages) can overflow shared memory on smaller GPUs.
    wide = dtype == torch.float32 and head_dim > 64
    return dtype == torch.float32, 32 if wide else 64


def plan_store(slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> None:
    """The kernels' per-step store plan: none (they read the slots on the device, and a
    host-side plan would break CUDA graph replays)."""
    return None


def plan_decode(
    context_lens: torch.Tensor, block_tables: torch.Tensor, k_cache: torch.Tensor
) -> None:
    """The kernels' per-step decode plan: none (see :func:`plan_store`)."""
    return None


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    plan: object = None,
) -> None:
    """Triton ``store_kv``: same contract as ``reference.store_kv`` (no plan used)."""
    _ref.validate_store(k, v, k_cache, v_cache, slot_mapping)
    _check_device(k_cache)
    n = k.shape[0]
    if n == 0:
        return
    _, bs, kvh, d = k_cache.shape
    k = k.to(k_cache.device).contiguous()
    v = v.to(k_cache.device).contiguous()
    slots = slot_mapping.to(k_cache.device).contiguous()
    block_hd = triton.next_power_of_2(kvh * d)
    block_t = min(triton.next_power_of_2(n), max(1, _STORE_ELEMS // block_hd))
    grid = (triton.cdiv(n, block_t),)
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, slots, n,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_cache_strides(k_cache, v_cache),
        HEAD_DIM=d, NUM_KV_HEADS=kvh, BLOCK_SIZE=bs, BLOCK_T=block_t, BLOCK_HD=block_hd,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    plan: object = None,
) -> torch.Tensor:
    """Triton ``decode_attention``: same contract as ``reference.decode_attention``
    (no plan used)."""
    _, bs, kvh, d = _ref.validate_cache(k_cache, v_cache)
    group = _ref.validate_query(q, k_cache)
    _ref.validate_tables(q.shape[0], context_lens, block_tables, k_cache.device)
    _check_device(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q = q.to(k_cache.dtype).contiguous()
    if q.shape[0] == 0:
        return out
    ctx = context_lens.to(torch.int32).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    upcast, block_n = _precision(k_cache.dtype, d)
    grid = (q.shape[0], kvh)
    _decode_kernel[grid](
        q, k_cache, v_cache, out, ctx, tables, float(scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        *_cache_strides(k_cache, v_cache),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=bs, BLOCK_N=block_n, UPCAST=upcast,
    )  # fmt: skip
    return out


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton ``prefill_attention``: same contract as ``reference.prefill_attention``."""
    _, bs, _, d = _ref.validate_cache(k_cache, v_cache)
    group = _ref.validate_query(q, k_cache)
    bounds, _ = _ref.validate_prefill(q, cu_seqlens_q, context_lens, block_tables, bs)
    _check_device(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q = q.to(k_cache.dtype).contiguous()
    batch = len(bounds) - 1
    max_q_len = max((b - a for a, b in itertools.pairwise(bounds)), default=0)
    if max_q_len == 0:
        return out
    cu = cu_seqlens_q.to(torch.int32).contiguous()
    ctx = context_lens.to(torch.int32).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    upcast, block_n = _precision(k_cache.dtype, d)
    grid = (triton.cdiv(max_q_len, _Q_TILE), batch, q.shape[1])
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu, ctx, tables, float(scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        *_cache_strides(k_cache, v_cache),
        GROUP=group, HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=bs, BLOCK_M=_Q_TILE, BLOCK_N=block_n, UPCAST=upcast,
    )  # fmt: skip
    return out
