"""Block-row copies by memmove: grouping into runs, exact bytes, refused inputs."""

from __future__ import annotations

import pytest
import torch

from kvtransfer import rows
from kvtransfer.rows import RowRuns, copy_runs, rows_match


def test_runs_group_rows_consecutive_on_both_sides() -> None:
    runs = RowRuns([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8])
    assert runs.runs == [(4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)]
    assert (runs.src_rows, runs.dst_rows) == (11, 9)
    assert RowRuns([], []).runs == []
    with pytest.raises(ValueError, match="negative row in -1 -> 0"):
        RowRuns([-1], [0])


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
        copy_runs(pairs, RowRuns(s_rows, d_rows))
    finally:
        rows._kernel.cache_clear()
    assert all(torch.equal(dst, want) for (_, dst), want in zip(pairs, wants, strict=True))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_big_copy_split_between_threads_is_exact(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # over 1 MiB: the kernel's threads and streaming stores; rows of 8252 bytes, so
    # neither their starts nor their lengths are multiples of the 32-byte stores
    monkeypatch.setattr(rows, "COPY_THREADS", threads)
    gen = torch.Generator().manual_seed(1)
    src, dst = torch.randn(400, 2063, generator=gen), torch.zeros(500, 2063)
    # a run of 50 rows (one range of 413 KB), then 100 scattered ones: 1.24 MB
    s_rows = [*range(10, 60), *(r for r in torch.randperm(400, generator=gen).tolist() if r >= 60)]
    d_rows = [
        *range(100, 150),
        *(r for r in torch.randperm(500, generator=gen).tolist() if r < 100),
    ]
    s_rows, d_rows = s_rows[:150], d_rows[:150]
    want = dst.clone()
    want[d_rows] = src[s_rows]
    copy_runs([(src, dst)], RowRuns(s_rows, d_rows))
    assert torch.equal(dst, want)


def test_copy_runs_refuses_what_it_cannot_copy_safely() -> None:
    src, dst = torch.zeros(4, 8), torch.zeros(6, 8)
    with pytest.raises(
        ValueError, match="need 5 source / 1 destination rows, the tensors have 4 / 6"
    ):
        copy_runs([(src, dst)], RowRuns([4], [0]))
    with pytest.raises(ValueError, match="need 1 source / 7 destination rows"):
        copy_runs([(src, dst)], RowRuns([0], [6]))
    with pytest.raises(ValueError, match=r"equal rows, got \(4, 8\) torch.float32 and \(6, 9\)"):
        # one bad pair refuses the whole copy, before any byte of the good one moves
        copy_runs([(src + 1, dst), (src, torch.zeros(6, 9))], RowRuns([0], [0]))
    assert not rows_match(src, dst.to(torch.bfloat16))
    assert not rows_match(src, torch.zeros(8, 6).t())  # not contiguous
    assert dst.abs().sum() == 0  # nothing was written
