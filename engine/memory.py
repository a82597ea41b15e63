"""Sizing the paged KV pool from a byte budget (no torch; shared with `plan memory`)."""

from __future__ import annotations

import os

from engine.config import CacheConfig
from engine.layout import dtype_bytes, kv_bytes_per_token
from engine.model_config import ModelConfig

__all__ = ["dtype_bytes", "host_memory_bytes", "kv_block_bytes", "num_kv_blocks"]


def kv_block_bytes(
    cfg: ModelConfig, block_size: int, dtype: str, tp: int = 1, num_layers: int | None = None
) -> int:
    """Bytes of one KV block (K and V of ``num_layers`` layers, default all) on one rank;
    the formula is ``engine.layout.kv_bytes_per_token``, shared with ``plan memory``."""
    return kv_bytes_per_token(cfg, dtype, tp, num_layers) * block_size


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def num_kv_blocks(
    cfg: ModelConfig,
    cache: CacheConfig,
    dtype: str,
    device_free_bytes: int,
    tp: int = 1,
    num_layers: int | None = None,
) -> int:
    """How many blocks the pool gets: ``num_blocks`` if fixed, else ``kv_cache_bytes``,
    else ``memory_fraction`` of ``device_free_bytes`` (memory left after weights).
    ``num_layers`` is the layers this rank's pipeline stage holds (default: all)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = cache.kv_cache_bytes
    if budget is None:
        budget = int(device_free_bytes * cache.memory_fraction)
    block = kv_block_bytes(cfg, cache.block_size, dtype, tp, num_layers)
    blocks = budget // block
    if blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds no block of {block} bytes; "
            "raise kv_cache_bytes or memory_fraction"
        )
    return blocks
