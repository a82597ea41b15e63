"""Block-row copies by memmove: grouping into runs, exact bytes, refused inputs."""

from __future__ import annotations

import pytest
import torch

from kvtransfer import rows
from kvtransfer.rows import copy_runs, row_runs, rows_match


def test_runs_group_rows_consecutive_on_both_sides() -> None:
    runs = row_runs([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8])
    assert runs == [(4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)]
    assert row_runs([], []) == []


@pytest.mark.parametrize("kernel", ["1", "0"])  # the C kernel, and the memmove loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_copy_runs_equals_indexed_copy(
    dtype: torch.dtype, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_CPU_KERNELS", kernel)
    rows._kernel.cache_clear()
    gen = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(20, 16, 2, 8, generator=gen).to(dtype),
         torch.randn(30, 16, 2, 8, generator=gen).to(dtype))
        for _ in range(3)
    ]  # fmt: skip
    s_rows, d_rows = [3, 4, 5, 19, 0, 7], [29, 10, 11, 0, 1, 2]
    wants = []
    for src, dst in pairs:
        wants.append(dst.clone())
        wants[-1][d_rows] = src[s_rows]
    try:
        assert (rows._kernel() is None) == (kernel == "0")
        copy_runs(pairs, s_rows, d_rows)
    finally:
        rows._kernel.cache_clear()
    assert all(torch.equal(dst, want) for (_, dst), want in zip(pairs, wants, strict=True))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_big_copy_split_between_threads_is_exact(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # over 1 MiB: the kernel's threads and streaming stores; rows of 8252 and 1028
    # bytes, so neither their starts nor their lengths are multiples of the 32-byte
    # stores (nor of the 256 KiB chunks the threads take)
    monkeypatch.setattr(rows, "COPY_THREADS", threads)
    gen = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(400, w, generator=gen), torch.zeros(500, w)) for w in (2063, 257)]
    # a run of 50 rows (one range of 413 KB), then 100 scattered ones: 1.24 MB
    s_rows = [*range(10, 60), *(r for r in torch.randperm(400, generator=gen).tolist() if r >= 60)]
    d_rows = [
        *range(100, 150),
        *(r for r in torch.randperm(500, generator=gen).tolist() if r < 100),
    ]
    s_rows, d_rows = s_rows[:150], d_rows[:150]
    wants = [dst.clone() for _, dst in pairs]
    for (src, _), want in zip(pairs, wants, strict=True):
        want[d_rows] = src[s_rows]
    copy_runs(pairs, s_rows, d_rows)
    assert all(torch.equal(dst, want) for (_, dst), want in zip(pairs, wants, strict=True))


def test_copy_runs_refuses_what_it_cannot_copy_safely() -> None:
    src, dst = torch.zeros(4, 8), torch.zeros(6, 8)
    with pytest.raises(ValueError, match=r"source rows 4\.\.4 outside the tensors' 4 rows"):
        copy_runs([(src, dst)], [4], [0])
    with pytest.raises(ValueError, match=r"destination rows 0\.\.6 outside the tensors' 6"):
        copy_runs([(src, dst)], [0, 0], [0, 6])
    with pytest.raises(ValueError, match=r"source rows -1\.\.0 outside"):
        copy_runs([(src, dst)], [0, -1], [1, 2])
    with pytest.raises(ValueError, match="2 source rows for 1 destination rows"):
        copy_runs([(src, dst)], [0, 1], [0])
    with pytest.raises(ValueError, match=r"equal rows, got \(4, 8\) torch.float32 and \(6, 9\)"):
        # one bad pair refuses the whole copy, before any byte of the good one moves
        copy_runs([(src + 1, dst), (src, torch.zeros(6, 9))], [0], [0])
    assert not rows_match(src, dst.to(torch.bfloat16))
    assert not rows_match(src, torch.zeros(8, 6).t())  # not contiguous
    assert dst.abs().sum() == 0  # nothing was written
