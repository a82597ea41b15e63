"""Process-level tuning for CPU inference, applied once before the first matmul.

Measured on the 2-core AVX2 machines this project runs on (figures in the README):
- glibc serves allocations over 128 KiB with mmap and unmaps them on free, so every
  step's large temporaries (gathered K/V, activations) page-fault afresh: raising the
  mmap and trim thresholds keeps freed memory for reuse (decode attention 2-4x faster).
- MKL on non-AVX-512 CPUs picks slow small-M GEMM paths; MKL_CBWR=AVX2 (conditional
  numerical reproducibility, pinned to AVX2 code) halves batch 8-32 matmul time.
- bf16 matmuls run ~6x slower than fp32 without AVX512-BF16/AMX.
Settings a user made in the environment win over ours.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def configure_cpu_runtime() -> None:
    """Allocator thresholds and MKL code path; idempotent, a no-op where unsupported."""
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
            libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
        except (OSError, AttributeError):
            pass  # not glibc
    if "MKL_CBWR" not in os.environ and not any(f.startswith("avx512") for f in _cpu_flags()):
        # Read by MKL at its first call: effective when no matmul has run yet.
        os.environ["MKL_CBWR"] = "AVX2"


@functools.cache
def cpu_half_is_fast() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU (a ~50 ms probe, done once)."""
    a = torch.randn(128, 512)
    w = torch.randn(1024, 512)

    def best(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), w.to(dtype)
        torch.nn.functional.linear(x, y)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            torch.nn.functional.linear(x, y)
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) < best(torch.float32)
