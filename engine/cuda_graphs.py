"""Decode steps replayed from CUDA graphs.

A decode step of a small batch launches a few hundred small kernels; from Python each
launch costs more host time than the GPU spends on it (measured on an H200: 0.49 ms per
Llama-3-8B layer per step against a fraction of that of device work). A graph captured
once per padded batch size replays them all in one launch.

Each graph reads fixed input buffers (token ids, positions, KV slots, context lengths,
block tables) sized for its batch; a step copies its tensors into the first rows and
pads the rest: padding rows write no KV (slot -1), attend over one token of block 0
and their logits are dropped. Only pure decode steps of a single-rank instance with
every row sampled use graphs (prefill shapes vary too much; collectives and MoE routing
are left to the eager path). Graphs hold the KV tensors they were captured with:
``use_kv()`` after the KV pool is reallocated.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import torch

from engine.forward_batch import ForwardBatch

KVCache = tuple[torch.Tensor, torch.Tensor]
Forward = Callable[[ForwardBatch, list[KVCache]], torch.Tensor]
# Padded batch sizes: exact for small batches, at most ~1.5x padding above.
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    """Captured decode forwards of ``forward`` over ``kv_caches`` for batches up to
    ``max_batch`` sequences of up to ``max_blocks`` KV blocks (captured on first use)."""

    def __init__(self, forward: Forward, kv_caches: list[KVCache], max_batch: int, max_blocks: int):
        if max_batch < 1 or max_blocks < 1:
            raise ValueError(f"max_batch and max_blocks must be >= 1: {max_batch}, {max_blocks}")
        self.forward = forward
        self.kv_caches = kv_caches
        self.sizes = [s for s in BATCH_SIZES if s < max_batch] + [max_batch]
        device = kv_caches[0][0].device
        n = self.sizes[-1]

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids, self.positions = zeros(n), zeros(n)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = zeros(n, max_blocks, dtype=torch.int32)
        self.logits_indices = torch.arange(n, device=device)
        self._empty_prefill = (zeros(1, dtype=torch.int32), zeros(0, dtype=torch.int32))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # torch's graph pool handle
        self.replays = 0

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` can replay a graph: decode rows only, all sampled, within
        the captured batch and table sizes."""
        n = batch.num_tokens
        return (
            batch.num_prefill_tokens == 0
            and 0 < n <= self.sizes[-1]
            and batch.logits_indices.numel() == n
            and batch.decode_block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The logits of ``batch`` (which must ``fit``), from its padded graph."""
        n = batch.num_tokens
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        graph, out = self.graphs.get(size) or self._capture(size)
        width = batch.decode_block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slots[:n].copy_(batch.slot_mapping)
        self.slots[n:size].fill_(-1)
        self.context_lens[:n].copy_(batch.decode_context_lens)
        self.context_lens[n:size].fill_(1)
        self.block_tables[:n, :width].copy_(batch.decode_block_tables)
        graph.replay()
        self.replays += 1
        return out[:n]

    def use_kv(self, kv_caches: list[KVCache]) -> None:
        """Switches to a reallocated KV pool: drops every graph (they point at the old
        tensors); the next steps capture anew."""
        self.kv_caches = kv_caches
        self.graphs.clear()
        self.pool = None

    def _static_batch(self, size: int) -> ForwardBatch:
        cu, empty = self._empty_prefill
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slots[:size],
            num_prefill_tokens=0,
            prefill_cu_seqlens_q=cu,
            prefill_context_lens=empty,
            prefill_block_tables=self.block_tables[:0],
            decode_context_lens=self.context_lens[:size],
            decode_block_tables=self.block_tables[:size],
            logits_indices=self.logits_indices[:size],
        )

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.slots[:size].fill_(-1)  # the warm-up and capture runs write no KV
        self.context_lens[:size].fill_(1)
        # Warm up on a side stream (Triton compiles, cuBLAS picks kernels) before capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(self._static_batch(size), self.kv_caches)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # A fresh batch: what the warm-up memoized per step (ForwardBatch.memo) must be
        # computed again inside the capture, or replays would reuse the warm-up's values.
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(self._static_batch(size), self.kv_caches)
        self.graphs[size] = (graph, out)
        return graph, out
