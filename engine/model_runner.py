"""Runs the model for one scheduled step: builds the batch tensors, forwards, samples."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine import single_row
from engine.attention import get_attention_backend
from engine.config import EngineConfig
from engine.cpu import configure_cpu_runtime, cpu_half_is_fast
from engine.cuda_graphs import DecodeGraphs
from engine.forward_batch import ForwardBatch
from engine.gemv import SingleRowGemv
from engine.huge_pages import move_to_huge_pages
from engine.kv_arena import KVArena
from engine.loader import load_weights
from engine.memory import host_memory_bytes, num_kv_blocks
from engine.model import CausalLM, KVCache
from engine.model_config import ModelConfig
from engine.parallel import ParallelContext, head_part
from engine.sampler import Sampler, SamplerOutput, make_generator, skip_draws
from engine.sampling_params import SamplingParams

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SeqStep:
    """One sequence's share of a step: the tokens to compute from ``start_pos`` on, its
    block table, and whether to sample its next token.

    Per-step messages are diffs (DESIGN.md): with ``appended`` set, ``block_table``
    holds only the block ids added since the runner last saw this request, which it
    appends to the table it keeps; otherwise ``block_table`` is the whole table."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    params: SamplingParams
    appended: bool = False
    # Tokens the request sampled before this step (e.g. the first, on a prefill
    # instance): a generator made for it here skips their draws, so seeded sampling
    # continues where it left off instead of starting over.
    num_sampled: int = 0


@dataclass(frozen=True)
class RuntimeInfo:
    """What the runner found out at start-up (never written back into the config)."""

    dtype: str
    num_blocks: int
    block_size: int
    max_model_len: int


def resolve_dtype(requested: str, checkpoint_dtype: str, device: str) -> str:
    """The compute dtype: as requested, or for "auto" the checkpoint's, except that on a
    CPU without fast half-precision matmuls half-precision checkpoints compute in fp32."""
    if requested != "auto":
        return requested
    dtype = checkpoint_dtype if checkpoint_dtype in TORCH_DTYPES else "float32"
    if device == "cpu" and dtype != "float32":
        return "bfloat16" if cpu_half_is_fast() else "float32"
    return dtype


class ModelRunner:
    """Owns one rank's model, KV cache and sampler."""

    def __init__(
        self,
        config: EngineConfig,
        model_cfg: ModelConfig,
        pc: ParallelContext | None = None,
        layers: range | None = None,
    ):
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.pc = pc or ParallelContext()
        # A pipeline stage holds only these layers' weights and KV (default: all).
        self.layers = range(model_cfg.num_layers) if layers is None else layers
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            configure_cpu_runtime()
        dtype = resolve_dtype(config.dtype, model_cfg.torch_dtype, self.device.type)
        max_len = min(
            config.max_model_len or model_cfg.max_position_embeddings,
            model_cfg.max_position_embeddings,
        )
        backend = get_attention_backend(config.attention_backend, self.device)
        self.attention_backend = backend.name
        torch_dtype = TORCH_DTYPES[dtype]
        with torch.device(self.device):
            self.model = CausalLM(
                model_cfg, torch_dtype, self.pc, backend, max_len, layers=self.layers
            )
        # CPU: weights on huge pages (a batch-1 step streams them all, see huge_pages),
        # moved before loading (which copies in place) so they are in memory once
        self.weight_arena = move_to_huge_pages(self.model) if self.device.type == "cpu" else None
        load_weights(self.model, model_cfg.model_type, config.model)
        self.model.eval()
        block_size = config.cache.block_size
        num_blocks = num_kv_blocks(
            model_cfg,
            config.cache,
            dtype,
            self._free_memory(),
            self.pc.tp_size,
            num_layers=len(self.layers),
        )
        self.kv_arena: KVArena | None = None
        self.kv_caches = self._allocate_kv(model_cfg, num_blocks, block_size, torch_dtype)
        self.info = RuntimeInfo(dtype, num_blocks, block_size, max_len)
        self.graphs = self._decode_graphs(model_cfg, max_len)
        # few-row steps on the library's GEMM; MoE layers' expert matmuls stay on torch's
        # threads, so their batched steps keep torch's path
        rows = 1 if model_cfg.num_experts else single_row.MAX_ROWS
        self.gemv = SingleRowGemv(torch.get_num_threads(), self.device, rows)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator | None] = {}
        self.block_tables: dict[str, list[int]] = {}  # kept across steps (diffs)

    def _decode_graphs(self, cfg: ModelConfig, max_len: int) -> DecodeGraphs | None:
        """CUDA graphs for decode steps: on CUDA with the Triton kernels (the torch
        reference reads lengths on the host), for a single-rank instance of a dense
        model (collectives and MoE routing stay eager)."""
        single = self.pc.tp_size == 1 and len(self.layers) == cfg.num_layers
        cuda = self.device.type == "cuda" and self.attention_backend == "triton"
        if not (self.config.cuda_graphs and cuda and single):
            return None
        if cfg.num_experts:
            return None
        max_blocks = -(-max_len // self.info.block_size)
        return DecodeGraphs(
            self.model, self.kv_caches, self.config.scheduler.max_num_seqs, max_blocks
        )

    def _free_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        return host_memory_bytes()

    def resize_kv(self, num_blocks: int) -> RuntimeInfo:
        """Reallocates the KV pool with ``num_blocks`` blocks (contents are dropped): the
        ranks of an instance agree on one count after each sized its own."""
        self.kv_caches = []  # free the old pool before allocating the new one
        if self.kv_arena is not None:
            self.kv_arena.retire()
            self.kv_arena = None
        dtype = TORCH_DTYPES[self.info.dtype]
        self.kv_caches = self._allocate_kv(
            self.model.config, num_blocks, self.info.block_size, dtype
        )
        self.info = replace(self.info, num_blocks=num_blocks)
        if self.graphs is not None:
            self.graphs.use_kv(self.kv_caches)
        return self.info

    def _allocate_kv(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype
    ) -> list[KVCache]:
        heads = head_part(cfg.num_kv_heads, cfg.head_dim, self.pc).local_rows // cfg.head_dim
        shape = (num_blocks, block_size, heads, cfg.head_dim)
        if self.config.cache.shared_memory:
            self.kv_arena = KVArena(len(self.layers), shape, dtype)
            return self.kv_arena.caches
        return [
            (
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
            )
            for _ in self.layers
        ]

    def execute(self, steps: list[SeqStep]) -> SamplerOutput:
        """Forwards one step (prefill entries first, then single-token decodes) and
        samples the next token of every entry with ``sample`` set, in order."""
        batch = self.build_batch(steps)
        if self.graphs is not None and self.graphs.fits(batch):
            return self.sample(steps, self.graphs.run(batch))
        with self.gemv.step(batch.num_tokens):
            logits = self.model(batch, self.kv_caches)
        return self.sample(steps, logits)

    def sample(self, steps: list[SeqStep], logits: torch.Tensor) -> SamplerOutput:
        """Samples the entries of ``steps`` with ``sample`` set from their ``logits`` rows."""
        sampled = [s for s in steps if s.sample]
        gens = [self._generator(s) for s in sampled]
        return self.sampler(logits, [s.params for s in sampled], gens)

    def _generator(self, step: SeqStep) -> torch.Generator | None:
        if step.request_id not in self.generators:
            gen = make_generator(step.params.seed, self.device)
            if gen is not None:
                skip_draws(gen, step.num_sampled)
            self.generators[step.request_id] = gen
        return self.generators[step.request_id]

    def free(self, request_ids: list[str]) -> None:
        """Forgets per-request state (sampling generators, block tables)."""
        for rid in request_ids:
            self.generators.pop(rid, None)
            self.block_tables.pop(rid, None)

    def _table(self, step: SeqStep) -> list[int]:
        """The request's whole block table after applying this step's part of it."""
        if not step.appended:
            whole = self.block_tables[step.request_id] = list(step.block_table)
            return whole
        table = self.block_tables.get(step.request_id)
        if table is None:
            raise ValueError(f"block ids appended to {step.request_id!r}, whose table is unknown")
        table.extend(step.block_table)
        return table

    def build_batch(self, steps: list[SeqStep]) -> ForwardBatch:
        """The batch tensors of ``steps``; applies their block-table diffs (call it once
        per step on each rank)."""
        bs = self.info.block_size
        prefill = [s for s in steps if len(s.token_ids) > 1]
        decode = [s for s in steps if len(s.token_ids) == 1]
        if steps != prefill + decode:
            raise ValueError("steps must list prefill entries before single-token decodes")
        tables = [self._table(s) for s in steps]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_idx: list[int] = []
        cu = [0]
        for s, table in zip(steps, tables, strict=True):
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            positions = range(s.start_pos, s.start_pos + n)
            pos.extend(positions)
            slots.extend(table[p // bs] * bs + p % bs for p in positions)
            if s.sample:
                logits_idx.append(len(ids) - 1)
            if n > 1:
                cu.append(cu[-1] + n)

        def tensor(x: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype, device=self.device)

        return ForwardBatch(
            input_ids=tensor(ids, torch.int64),
            positions=tensor(pos, torch.int64),
            slot_mapping=tensor(slots, torch.int64),
            num_prefill_tokens=cu[-1],
            prefill_cu_seqlens_q=tensor(cu),
            prefill_context_lens=tensor([s.start_pos + len(s.token_ids) for s in prefill]),
            prefill_block_tables=self._tables(tables[: len(prefill)]),
            decode_context_lens=tensor([s.start_pos + 1 for s in decode]),
            decode_block_tables=self._tables(tables[len(prefill) :]),
            logits_indices=tensor(logits_idx, torch.int64),
        )

    def _tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(tables), width)
