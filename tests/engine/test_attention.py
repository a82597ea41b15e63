"""Paged attention: torch reference and Triton kernels against a naive fp64 ground truth.

Triton runs on CPU through the interpreter (conftest sets TRITON_INTERPRET=1), which
costs per program instance, so it gets a pairwise subset of the parameter grid.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.attention import (
    AttentionBackend,
    AttentionBackendImpl,
    get_attention_backend,
    triton_available,
)
from engine.attention import reference as ref

# Triton runs on CUDA when there is one, else in the interpreter on CPU.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    not triton_available()
    or (TRITON_DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
LENGTHS = {  # name: (context_lens, q_lens); decode uses q_len 1
    "no_prefix": ([1, 17, 33, 50], [1, 17, 33, 50]),
    "prefix": ([1, 17, 33, 50], [1, 5, 16, 20]),
    "long": ([150, 200], [70, 200]),  # several query and key tiles per sequence
    "gpu": ([1, 17, 300, 1000], [1, 17, 100, 1000]),
}


# The torch functions alone: the "torch" backend decodes fp32 through the C kernel.
REFERENCE = AttentionBackendImpl(
    "reference", ref.store_kv, ref.prefill_attention, ref.decode_attention, ref.plan_store,
    ref.plan_decode,
)  # fmt: skip


def backend_and_device(name: str) -> tuple[AttentionBackend, torch.device]:
    if name == "reference":
        return REFERENCE, torch.device("cpu")
    device = TRITON_DEVICE if name == "triton" else torch.device("cpu")
    return get_attention_backend(name, device), device


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The tensors here are tiny: on a busy 2-core machine, intra-op threads only add
    # barrier waits (10-100x slower); restore the setting for other modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    keys: list[torch.Tensor]  # dense [ctx, kvh, d] per sequence
    values: list[torch.Tensor]
    q_lens: list[int]
    scale: float

    def to(self, device: torch.device) -> Case:
        """Move what the kernels read; the dense K/V for the ground truth stay on CPU."""
        moved = {f: getattr(self, f).to(device) for f in ("q", "k_cache", "v_cache")}
        meta = ("cu_seqlens", "context_lens", "block_tables")
        moved.update({f: getattr(self, f).to(device) for f in meta})
        return dataclasses.replace(self, **moved)


def make_case(
    ctx_lens: list[int],
    q_lens: list[int],
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Case:
    """Random K/V written at shuffled blocks of a garbage-filled cache; padded tables."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = (torch.randn(shape, generator=gen) * 100).to(dtype)
    v_cache = (torch.randn(shape, generator=gen) * 100).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(ctx_lens), max(need) + 2, dtype=torch.int32)
    keys, values, used = [], [], 0
    for i, (ctx, n) in enumerate(zip(ctx_lens, need, strict=True)):
        tables[i, :n] = perm[used : used + n]
        tables[i, n:] = -1 if i % 2 else 0  # padding may hold any value
        used += n
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(ctx)
        blocks = tables[i, pos // block_size].long()
        k_cache[blocks, pos % block_size] = k
        v_cache[blocks, pos % block_size] = v
        keys.append(k)
        values.append(v)
    num_heads = num_kv_heads * group
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx_t = torch.tensor(ctx_lens, dtype=torch.int32)
    return Case(q, k_cache, v_cache, cu, ctx_t, tables, keys, values, q_lens, head_dim**-0.5)


def _naive_attention(case: Case) -> torch.Tensor:
    """Per sequence, per head, plain fp64 causal attention over the dense K/V."""
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    group = case.q.shape[1] // case.keys[0].shape[1]
    row = 0
    for k, v, q_len in zip(case.keys, case.values, case.q_lens, strict=True):
        ctx = k.shape[0]
        q_pos = torch.arange(ctx - q_len, ctx)[:, None]
        future = torch.arange(ctx)[None, :] > q_pos  # [q_len, ctx]
        for h in range(case.q.shape[1]):
            q = case.q[row : row + q_len, h].cpu().double()
            scores = q @ k[:, h // group].double().T * case.scale
            probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=1)
            out[row : row + q_len, h] = probs @ v[:, h // group].double()
        row += q_len
    return out


def run_prefill(backend: AttentionBackend, case: Case) -> torch.Tensor:
    return backend.prefill_attention(
        case.q, case.k_cache, case.v_cache, case.cu_seqlens, case.context_lens,
        case.block_tables, case.scale,
    )  # fmt: skip


def run_decode(backend: AttentionBackend, case: Case) -> torch.Tensor:
    return backend.decode_attention(
        case.q, case.k_cache, case.v_cache, case.context_lens, case.block_tables, case.scale
    )


def check(name: str, mode: str, lengths: str, group: int, d: int, bs: int,
          dtype: torch.dtype, num_kv_heads: int = 2) -> None:  # fmt: skip
    backend, device = backend_and_device(name)
    ctx_lens, q_lens = LENGTHS[lengths]
    if mode == "decode":
        q_lens = [1] * len(ctx_lens)
    case = make_case(ctx_lens, q_lens, group, d, bs, dtype, num_kv_heads).to(device)
    out = run_decode(backend, case) if mode == "decode" else run_prefill(backend, case)
    # torch.device("cuda") != torch.device("cuda:0"): compare the kind of device.
    assert out.dtype == dtype and out.shape == case.q.shape and out.device.type == device.type
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), _naive_attention(case), atol=tol, rtol=tol)


MODES = [("decode", "prefix"), ("prefill", "no_prefix"), ("prefill", "prefix")]
GRID = [
    (g, d, bs, dt)
    for g in (1, 2, 4)
    for d in (64, 128)
    for bs in (16, 32)
    for dt in (torch.float32, torch.bfloat16)
]
# Pairwise cover of (group, head_dim, block_size, dtype) for the interpreter, whose
# cost grows with the number of query heads: at most 4 of them.
TRITON_GRID = [
    (1, 64, 16, torch.float32, 2),
    (1, 128, 32, torch.bfloat16, 2),
    (2, 64, 32, torch.bfloat16, 2),
    (2, 128, 16, torch.float32, 2),
    (4, 64, 16, torch.bfloat16, 1),
    (4, 128, 32, torch.float32, 1),
]


@pytest.mark.parametrize("name", ["torch", "reference"])
@pytest.mark.parametrize(("mode", "lengths"), MODES)
@pytest.mark.parametrize(("group", "d", "bs", "dtype"), GRID)
def test_reference_matches_naive(
    name: str, mode: str, lengths: str, group: int, d: int, bs: int, dtype: torch.dtype
) -> None:
    check(name, mode, lengths, group, d, bs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("mode", "lengths"), [*MODES, ("decode", "long"), ("prefill", "long")])
def test_reference_long(mode: str, lengths: str, dtype: torch.dtype) -> None:
    check("torch", mode, lengths, 2, 64, 16, dtype)


@needs_triton
@pytest.mark.parametrize(("mode", "lengths"), MODES)
@pytest.mark.parametrize(("group", "d", "bs", "dtype", "kvh"), TRITON_GRID)
def test_triton_matches_naive(
    mode: str, lengths: str, group: int, d: int, bs: int, dtype: torch.dtype, kvh: int
) -> None:
    check("triton", mode, lengths, group, d, bs, dtype, kvh)


@needs_triton
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_long(mode: str, dtype: torch.dtype) -> None:
    check("triton", mode, "long", 2, 64, 16, dtype, num_kv_heads=1)


BACKENDS = ["torch", "reference", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_skips_padding(name: str, dtype: torch.dtype) -> None:
    backend, device = backend_and_device(name)
    k_cache = torch.zeros(6, 16, 2, 64, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(2, 7, 2, 64).to(dtype).unbind(0)
    slots = torch.tensor([3, -1, 17, 95, -1, 40, 0])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // 16, s % 16], want_v[s // 16, s % 16] = k[i], v[i]
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    backend.store_kv(k.to(device), v.to(device), k_cache, v_cache, slots.to(device))
    assert torch.equal(k_cache.cpu(), want_k) and torch.equal(v_cache.cpu(), want_v)


def test_store_kv_non_contiguous_cache() -> None:
    base = torch.zeros(2, 4, 3, 3, 16)  # K, V and a spare plane interleaved per slot
    k_cache, v_cache = base[:, :, 0], base[:, :, 1]
    k, v = torch.randn(3, 3, 16), torch.randn(3, 3, 16)
    ref.store_kv(k, v, k_cache, v_cache, torch.tensor([0, 5, -1]))
    assert torch.equal(k_cache[0, 0], k[0]) and torch.equal(v_cache[1, 1], v[1])
    assert int(base[:, :, 2].count_nonzero()) == 0


@pytest.mark.parametrize("name", BACKENDS)
def test_decode_empty_context_gives_zeros(name: str) -> None:
    backend, device = backend_and_device(name)
    case = make_case([5, 9], [1, 1], 2, 64, 16, torch.float32)
    case.context_lens[0] = 0
    out = run_decode(backend, case.to(device)).cpu()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_prefill_with_empty_sequence(name: str) -> None:
    backend, device = backend_and_device(name)
    case = make_case([5, 9, 20], [3, 0, 20], 2, 64, 16, torch.float32).to(device)
    got = run_prefill(backend, case).cpu().double()
    torch.testing.assert_close(got, _naive_attention(case), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_rejects_bad_inputs(name: str) -> None:
    backend, device = backend_and_device(name)
    case = make_case([5], [5], 2, 64, 16, torch.float32).to(device)
    bad_q = dataclasses.replace(case, q=torch.randn(5, 3, 64, device=device))  # 3 heads / 2
    with pytest.raises(ValueError, match="num_heads 3"):
        run_prefill(backend, bad_q)
    case.context_lens[0] = 2  # fewer keys than queries
    with pytest.raises(ValueError, match="context_len"):
        run_prefill(backend, case)


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert get_attention_backend("torch", cpu).name == "torch"
    assert get_attention_backend("auto", cpu).name == "torch"
    with pytest.raises(ValueError, match="'bogus'"):
        get_attention_backend("bogus", cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        get_attention_backend("triton", cpu)
    if triton_available():
        from engine.attention import triton_kernels

        monkeypatch.setenv("TRITON_INTERPRET", "1")
        backend = get_attention_backend("triton", cpu)
        assert backend.name == "triton"
        assert backend.decode_attention is triton_kernels.decode_attention


def _run_without_interpreter(code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=300)


def test_import_needs_no_gpu_or_interpreter() -> None:
    _run_without_interpreter(
        "import sys, torch, engine.attention as a;"
        "assert a.get_attention_backend('auto', torch.device('cpu')).name == 'torch';"
        "assert 'engine.attention.triton_kernels' not in sys.modules"
    )


def compile_kernels_for_cuda(arch: int = 90) -> None:
    """Compile the kernels to cubin for ``sm_<arch>`` with no GPU (catches GPU-only errors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.attention import triton_kernels as kernels

    ints = {"ctx_ptr": "*i32", "bt_ptr": "*i32", "cu_ptr": "*i32", "slot_ptr": "*i64"}
    common = {"HEAD_DIM": 128, "BLOCK_SIZE": 16}
    attn = {**common, "GROUP": 4, "D_PAD": 128}
    builds = [
        (kernels._store_kv_kernel, "bf16", {**common, "NUM_KV_HEADS": 8, "BLOCK_T": 4,
                                             "BLOCK_HD": 1024}),
        (kernels._decode_kernel, "bf16", {**attn, "G_PAD": 16, "BLOCK_N": 64, "UPCAST": False}),
        (kernels._prefill_kernel, "bf16", {**attn, "BLOCK_M": 64, "BLOCK_N": 64, "UPCAST": False}),
        (kernels._prefill_kernel, "fp32", {**attn, "BLOCK_M": 64, "BLOCK_N": 32, "UPCAST": True}),
    ]  # fmt: skip
    for fn, dtype, consts in builds:
        sig = {
            n: "constexpr" if n in consts
            else ints.get(n, f"*{dtype}") if n.endswith("_ptr")
            else "fp32" if n == "scale" else "i32"
            for n in fn.arg_names
        }  # fmt: skip
        idx = {(fn.arg_names.index(n),): v for n, v in consts.items()}
        triton.compile(ASTSource(fn, sig, idx), target=GPUTarget("cuda", arch, 32))


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_cuda() -> None:
    """~10 s on first run (then Triton's cache): the only GPU-path check without a GPU."""
    _run_without_interpreter(
        "from tests.engine.test_attention import compile_kernels_for_cuda as c; c()"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_cuda_long_contexts(mode: str, dtype: torch.dtype) -> None:
    assert get_attention_backend("auto", torch.device("cuda")).name == "triton"
    check("triton", mode, "gpu", 4, 128, 16, dtype)


DECODE_LENGTHS = [[17], [33, 33], [1, 17, 33, 50], [0, 9], [0, 0]]


@pytest.mark.parametrize("ctx_lens", DECODE_LENGTHS)
def test_decode_plan_gives_the_same_output(ctx_lens: list[int]) -> None:
    """A step's layers share one plan: its output equals planning per call, and the
    ground truth; equal lengths (batch 1 included) need no mask."""
    case = make_case([max(c, 1) for c in ctx_lens], [1] * len(ctx_lens), 2, 64, 16, torch.float32)
    case.context_lens[:] = torch.tensor(ctx_lens)
    plan = ref.plan_decode(case.context_lens, case.block_tables, case.k_cache)
    assert (plan.mask is None) == (len(set(ctx_lens)) == 1)
    assert (plan.empty is not None) == (0 in ctx_lens and max(ctx_lens) > 0)
    args = (case.q, case.k_cache, case.v_cache, case.context_lens, case.block_tables, case.scale)
    planned = ref.decode_attention(*args, plan)
    assert torch.equal(planned, ref.decode_attention(*args))
    for i, ctx in enumerate(ctx_lens):
        if ctx == 0:
            assert torch.equal(planned[i], torch.zeros_like(planned[i]))
            continue
        one = dataclasses.replace(case, keys=case.keys[i : i + 1], values=case.values[i : i + 1],
                                  q=case.q[i : i + 1], q_lens=[1])  # fmt: skip
        want = _naive_attention(one)
        torch.testing.assert_close(planned[i : i + 1].double(), want, atol=1e-4, rtol=1e-4)


def test_decode_plan_must_fit_the_call() -> None:
    case = make_case([5, 9], [1, 1], 2, 64, 16, torch.float32)
    plan = ref.plan_decode(case.context_lens[:1], case.block_tables[:1], case.k_cache)
    args = (case.q, case.k_cache, case.v_cache, case.context_lens, case.block_tables, case.scale)
    with pytest.raises(ValueError, match="decode plan for 1 sequences"):
        ref.decode_attention(*args, plan)
    other = ref.plan_decode(case.context_lens, case.block_tables, case.k_cache[:-1])
    with pytest.raises(ValueError, match=r"over \(4, 16\).*got q of 2 over \(5, 16\)"):
        ref.decode_attention(*args, other)
    case.context_lens[1] = 10_000
    with pytest.raises(ValueError, match="context_len 10000 exceeds"):
        ref.plan_decode(case.context_lens, case.block_tables, case.k_cache)


def test_store_plan_gives_the_same_cache() -> None:
    k_cache = torch.zeros(6, 16, 2, 64)
    k, v = torch.randn(2, 5, 2, 64).unbind(0)
    for slots in (torch.tensor([3, 17, 95, 40, 0]), torch.tensor([3, -1, 17, -1, 40])):
        plan = ref.plan_store(slots, k_cache)
        assert (plan.keep is None) == bool((slots >= 0).all())
        planned = (k_cache.clone(), k_cache.clone())
        ref.store_kv(k, v, *planned, slots, plan)
        unplanned = (k_cache.clone(), k_cache.clone())
        ref.store_kv(k, v, *unplanned, slots)
        assert all(torch.equal(a, b) for a, b in zip(planned, unplanned, strict=True))
        assert int(planned[0].count_nonzero()) == int((slots >= 0).sum()) * 2 * 64


def test_triton_backend_plans_nothing() -> None:
    # The kernels read slots and tables on the device (CUDA graphs replay them).
    from engine.attention import triton_kernels

    case = make_case([5], [1], 2, 64, 16, torch.float32)
    assert triton_kernels.plan_decode(case.context_lens, case.block_tables, case.k_cache) is None
    assert triton_kernels.plan_store(case.context_lens.long(), case.k_cache) is None
