"""The C decode kernel: built on first use, equal to the torch reference within fp32
rounding, split over threads alike, and out of the way where it does not apply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.attention import cpu_decode
from engine.attention import reference as ref
from tests.engine.test_attention import make_case


@pytest.fixture
def kernel() -> Iterator[None]:
    if cpu_decode.library() is None:
        pytest.skip("no C compiler here: the torch reference serves")
    yield


def _both(case_args: tuple[torch.Tensor, ...], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu_decode.decode_attention(*case_args, scale), ref.decode_attention(*case_args, scale)


@pytest.mark.parametrize("ctx_lens", [[151], [1, 17, 33, 50], [0, 9, 16], [0, 0]])
@pytest.mark.parametrize(("group", "d", "bs"), [(1, 64, 16), (2, 128, 32), (4, 64, 16)])
def test_kernel_matches_the_reference(
    kernel: None, ctx_lens: list[int], group: int, d: int, bs: int
) -> None:
    case = make_case([max(c, 1) for c in ctx_lens], [1] * len(ctx_lens), group, d, bs,
                     torch.float32)  # fmt: skip
    case.context_lens[:] = torch.tensor(ctx_lens)
    args = (case.q, case.k_cache, case.v_cache, case.context_lens, case.block_tables)
    got, want = _both(args, case.scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for i in (i for i, c in enumerate(ctx_lens) if c == 0):
        assert torch.equal(got[i], torch.zeros_like(got[i]))


def test_threads_split_the_batch_alike(kernel: None) -> None:
    case = make_case([170] * 32, [1] * 32, 2, 64, 16, torch.float32)
    args = (case.q, case.k_cache, case.v_cache, case.context_lens, case.block_tables)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_decode.decode_attention(*args, case.scale)
        torch.set_num_threads(2)  # 32 x 170 keys: above SPLIT_KEYS, two chunks
        two = cpu_decode.decode_attention(*args, case.scale)
    finally:
        torch.set_num_threads(before)
    assert cpu_decode.SPLIT_KEYS <= 32 * 170 and torch.equal(one, two)


def test_a_table_outside_the_cache_is_refused(kernel: None) -> None:
    case = make_case([20], [1], 2, 64, 16, torch.float32)
    case.block_tables[0, 1] = case.k_cache.shape[0] + 5
    args = (case.q, case.k_cache, case.v_cache, case.context_lens, case.block_tables)
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_decode.decode_attention(*args, case.scale)


def test_other_dtypes_and_switched_off_use_the_reference(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    case = make_case([5, 30], [1, 1], 2, 64, 16, torch.bfloat16)
    args = (case.q, case.k_cache, case.v_cache, case.context_lens, case.block_tables)
    got, want = _both(args, case.scale)
    assert torch.equal(got, want)
    monkeypatch.setenv("PDSERVE_CPU_KERNELS", "0")
    cpu_decode.library.cache_clear()
    try:
        assert cpu_decode.library() is None
        fp32 = make_case([5, 30], [1, 1], 2, 64, 16, torch.float32)
        args = (fp32.q, fp32.k_cache, fp32.v_cache, fp32.context_lens, fp32.block_tables)
        got, want = _both(args, fp32.scale)
        assert torch.equal(got, want)
    finally:
        cpu_decode.library.cache_clear()


def test_builds_into_its_cache_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kernel: None
) -> None:
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE", str(tmp_path))
    cpu_decode.library.cache_clear()
    try:
        assert cpu_decode.library() is not None
        (built,) = tmp_path.glob("paged_decode-*.so")
        assert built.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))
    finally:
        cpu_decode.library.cache_clear()
