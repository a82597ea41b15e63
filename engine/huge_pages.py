"""A CPU model's weights moved into one arena of transparent huge pages.

A batch-1 decode step streams every weight once. On 4 KiB pages that is a TLB miss
every 4 KiB of each of the GEMV's row streams; on 2 MiB pages, one per 2 MiB. Measured
on this project's 2-core AVX2 machine (THP in ``madvise`` mode, the common default):
small's 32 decoder GEMVs streamed 94 MB at a median 17-22 GB/s on 4 KiB pages and
23-24 GB/s on huge pages (interleaved runs). Linux only; elsewhere, or where the
kernel declines, the weights stay where they are.
"""

from __future__ import annotations

import mmap
import sys

import torch
from torch import nn

_ALIGN = 64  # bytes: a cache line, and what torch's CPU allocator gives


class WeightArena:
    """Holds the mapping the moved parameters view (it must outlive them)."""

    def __init__(self, nbytes: int):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self.mmap = mmap.mmap(-1, nbytes, flags=flags)
        advise = getattr(mmap, "MADV_HUGEPAGE", None)
        self.huge = False
        if advise is not None:
            try:
                self.mmap.madvise(advise)  # before the first touch: faults take 2 MiB
                self.huge = True
            except OSError:
                pass  # THP off in this kernel: plain pages, still one arena
        self.buffer = torch.frombuffer(self.mmap, dtype=torch.uint8)
        self.used = 0

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` (contiguous) in the arena."""
        nbytes = t.numel() * t.element_size()
        start, end = self.used, -(-(self.used + nbytes) // _ALIGN) * _ALIGN
        if end > self.buffer.numel():
            raise ValueError(f"arena of {self.buffer.numel()} bytes cannot hold {end}")
        self.used = end
        out = self.buffer[start : start + nbytes].view(t.dtype).view(t.shape)
        out.copy_(t)
        return out


def move_to_huge_pages(model: nn.Module) -> WeightArena | None:
    """Moves ``model``'s CPU parameters into one huge-page arena (``param.data``
    replaced; parameters shared between modules move once); the arena, or None where
    nothing moved (not Linux, no CPU parameters)."""
    params = [p for p in model.parameters() if p.device.type == "cpu" and p.numel()]
    if not sys.platform.startswith("linux") or not params:
        return None
    sizes = [-(-p.numel() * p.element_size() // _ALIGN) * _ALIGN for p in params]
    arena = WeightArena(sum(sizes))
    for p in params:
        p.data = arena.take(p.data.contiguous())
    return arena
