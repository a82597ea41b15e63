"""A stand-in worker for tests and benchmarks: random KV caches behind the mixin.

Wrap it with ``ray.remote(num_cpus=..., max_concurrency=...)``; it holds one rank's
slice (``layers`` x ``kv_heads``) of a model's KV in ``num_blocks`` blocks.
"""

from __future__ import annotations

import os

import torch

from kvtransfer.blocks import DTYPES, KVView
from kvtransfer.worker import KVTransferMixin


class KVHolder(KVTransferMixin):
    """Random KV caches shaped like ``ModelRunner.kv_caches`` for one rank."""

    def __init__(
        self,
        layers: range,
        kv_heads: range,
        num_blocks: int,
        block_size: int = 16,
        head_dim: int = 64,
        dtype: str = "float32",
        seed: int = 0,
        threads: int = 1,
    ):
        torch.set_num_threads(threads)
        self.reset(layers, kv_heads, num_blocks, block_size, head_dim, dtype, seed)

    def reset(
        self,
        layers: range,
        kv_heads: range,
        num_blocks: int,
        block_size: int = 16,
        head_dim: int = 64,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        """Replaces the caches with new random ones of this geometry."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        gen = torch.Generator().manual_seed(seed)
        shape = (num_blocks, block_size, len(kv_heads), head_dim)
        self.caches = [
            (
                torch.randn(shape, generator=gen).to(DTYPES[dtype]),
                torch.randn(shape, generator=gen).to(DTYPES[dtype]),
            )
            for _ in layers
        ]
        self.layers, self.kv_heads = layers, kv_heads

    def kv_view(self) -> KVView:
        """The held caches as a KV view."""
        return KVView(self.caches, self.layers, self.kv_heads)

    def get_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the caches (for the driver to compare)."""
        return [(k.clone(), v.clone()) for k, v in self.caches]

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()
