"""A stand-in worker for tests and benchmarks: random KV caches behind the mixin
(``shared=True``: in a shared-memory pool, as an engine worker with
``CacheConfig.shared_memory``).

Wrap it with ``ray.remote(num_cpus=..., max_concurrency=...)``; it holds one rank's
slice (``layers`` x ``kv_heads``) of a model's KV in ``num_blocks`` blocks.
"""

from __future__ import annotations

import os

import torch

from engine.kv_arena import KVArena
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
        shared: bool = False,
    ):
        torch.set_num_threads(threads)
        self.shared = shared
        self.arena: KVArena | None = None
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
        """Replaces the caches with new random ones of this geometry (in a new
        shared-memory pool when the holder is ``shared``; the old pool is retired)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        gen = torch.Generator().manual_seed(seed)
        shape = (num_blocks, block_size, len(kv_heads), head_dim)
        if self.arena is not None:
            self.arena.retire()
        self.arena = KVArena(len(layers), shape, DTYPES[dtype]) if self.shared else None
        caches = (
            self.arena.caches
            if self.arena
            else [
                (torch.empty(shape, dtype=DTYPES[dtype]), torch.empty(shape, dtype=DTYPES[dtype]))
                for _ in layers
            ]
        )
        for k, v in caches:
            k.copy_(torch.randn(shape, generator=gen))
            v.copy_(torch.randn(shape, generator=gen))
        self.caches = caches
        self.layers, self.kv_heads = layers, kv_heads

    def kv_view(self) -> KVView:
        """The held caches as a KV view."""
        return KVView(self.caches, self.layers, self.kv_heads, self.arena)

    def get_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the caches (for the driver to compare)."""
        return [(k.clone(), v.clone()) for k, v in self.caches]

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()
