"""The decoder-only transformer shared by every supported family.

Families differ only in switches read from ``ModelConfig`` (qkv bias, q/k RMSNorm, MoE
layers, tied embeddings); their checkpoint names are mapped in ``engine/families.py``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.forward_batch import ForwardBatch
from engine.fused_stack import fused_stack
from engine.layers import RMSNorm, RotaryEmbedding
from engine.model_config import ModelConfig
from engine.moe import SparseMoeBlock
from engine.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    Part,
    RowParallelLinear,
    VocabParallelEmbedding,
    head_part,
)

if TYPE_CHECKING:
    from engine.attention import AttentionBackend

KVCache = tuple[torch.Tensor, torch.Tensor]

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class Attention(nn.Module):
    """GQA self-attention over the paged KV cache; heads split over TP ranks."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        pc: ParallelContext,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
    ):
        super().__init__()
        d = cfg.head_dim
        q_part = head_part(cfg.num_heads, d, pc)
        kv_part = head_part(cfg.num_kv_heads, d, pc)
        self.num_heads = q_part.local_rows // d
        self.num_kv_heads = kv_part.local_rows // d
        self.head_dim = d
        self.scale = d**-0.5
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, [q_part, kv_part, kv_part], cfg.attention_bias, dtype
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, False, dtype, pc)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rotary = rotary
        self.backend = backend

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch, kv: KVCache
    ) -> torch.Tensor:
        n, d, h = x.shape[0], self.head_dim, self.num_heads
        q_size, kv_size = h * d, self.num_kv_heads * d
        qkv = self.qkv_proj(x)
        v = qkv[:, q_size + kv_size :].reshape(n, self.num_kv_heads, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qkv[:, :q_size].reshape(n, h, d), qkv[:, q_size : q_size + kv_size]
            qk = torch.cat((self.q_norm.norm(q), self.k_norm.norm(k.reshape(n, -1, d))), 1)
        else:  # q and k are adjacent in qkv: rotated together, as one tensor
            qk = qkv[:, : q_size + kv_size].view(n, -1, d)
        rope = batch.memo("rope", lambda: self.rotary.tables(positions))
        qk = self.rotary.rotate(qk, rope)
        q, k = qk[:, :h], qk[:, h:]
        k_cache, v_cache = kv
        store = batch.memo("store", lambda: self.backend.plan_store(batch.slot_mapping, k_cache))
        self.backend.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, store)
        p = batch.num_prefill_tokens
        if p == n:
            out = self._prefill(q, batch, kv)
        elif p == 0:
            out = self._decode(q, batch, kv)
        else:
            out = torch.cat((self._prefill(q[:p], batch, kv), self._decode(q[p:], batch, kv)))
        return self.o_proj(out.reshape(n, q_size))

    def _prefill(self, q: torch.Tensor, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        return self.backend.prefill_attention(
            q,
            kv[0],
            kv[1],
            batch.prefill_cu_seqlens_q,
            batch.prefill_context_lens,
            batch.prefill_block_tables,
            self.scale,
        )

    def _decode(self, q: torch.Tensor, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        ctx, tables = batch.decode_context_lens, batch.decode_block_tables
        plan = batch.memo("decode", lambda: self.backend.plan_decode(ctx, tables, kv[0]))
        return self.backend.decode_attention(q, kv[0], kv[1], ctx, tables, self.scale, plan)


class MLP(nn.Module):
    """SwiGLU MLP: fused column-parallel gate/up, row-parallel down."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, pc: ParallelContext):
        super().__init__()
        part = Part(inter, pc.tp_size, pc.tp_rank)
        self.local_inter = part.local_rows
        self.gate_up_proj = ColumnParallelLinear(hidden, [part, part], False, dtype)
        self.down_proj = RowParallelLinear(inter, hidden, False, dtype, pc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        i = self.local_inter
        return self.down_proj(nn.functional.silu(h[:, :i]) * h[:, i:])


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        pc: ParallelContext,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
    ):
        super().__init__()
        self.self_attn = Attention(cfg, dtype, pc, rotary, backend)
        self.mlp: nn.Module = (
            SparseMoeBlock(cfg, dtype, pc)
            if cfg.is_moe_layer(layer)
            else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, pc)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        kv: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch, kv)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and final norm; names mirror Hugging Face's ``model.``.

    A pipeline stage builds only ``layers`` (the others are parameter-free placeholders,
    so checkpoint names keep their global layer index), the embedding when it is the
    first stage (or the last stage of a tied model, whose head is the embedding) and the
    final norm when it is the last.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        pc: ParallelContext,
        backend: AttentionBackend,
        max_positions: int,
        layers: range | None = None,
    ):
        super().__init__()
        self.stage_layers = range(cfg.num_layers) if layers is None else layers
        self.is_first = self.stage_layers.start == 0
        self.is_last = self.stage_layers.stop == cfg.num_layers
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope)
        self.embed_tokens: VocabParallelEmbedding | None = None
        if self.is_first or (self.is_last and cfg.tie_word_embeddings):
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, pc)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype, pc, rotary, backend)
            if i in self.stage_layers
            else nn.Identity()
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype) if self.is_last else None
        # batch-1 CPU decode of all this stage's layers in one C call
        stage = [m for m in self.layers if isinstance(m, DecoderLayer)]
        self.fused = fused_stack(stage, pc.tp_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None or not self.is_first:
            raise RuntimeError("only the first pipeline stage embeds tokens")
        return self.embed_tokens(input_ids)

    def run_layers(
        self,
        batch: ForwardBatch,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_caches: list[KVCache],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This stage's layers; ``kv_caches`` holds one entry per stage layer."""
        if self.fused is not None and (out := self.fused(batch, x, residual, kv_caches)):
            return out
        layers = [self.layers[i] for i in self.stage_layers]
        for layer, kv in zip(layers, kv_caches, strict=True):
            x, residual = layer(batch.positions, x, residual, batch, kv)
        return x, residual

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.norm is None:
            raise RuntimeError("only the last pipeline stage holds the final norm")
        x, _ = self.norm(x, residual)
        return x

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        x, residual = self.run_layers(batch, self.embed(batch.input_ids), None, kv_caches)
        return self.final_norm(x, residual)


class CausalLM(nn.Module):
    """The model plus its LM head (shared with the embedding when tied). With ``layers``
    set it is one pipeline stage: see ``DecoderModel``; the head lives on the last."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        pc: ParallelContext,
        backend: AttentionBackend,
        max_positions: int,
        layers: range | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, dtype, pc, backend, max_positions, layers)
        self.lm_head: VocabParallelEmbedding | None = None
        if self.model.is_last:
            self.lm_head = (
                self.model.embed_tokens
                if cfg.tie_word_embeddings
                else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, pc)
            )

    def owns_tensor(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to this stage (the loader skips
        the others): its layers, the embedding and the head/final norm as above."""
        m = _LAYER_NAME.match(name)
        if m is not None:
            return int(m.group(1)) in self.model.stage_layers
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None
        if name.startswith(("model.norm.", "lm_head.")):
            return self.model.is_last
        return True

    def logits(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits (fp32) of the rows to sample, from the last layer's normed output."""
        if self.lm_head is None:
            raise RuntimeError("only the last pipeline stage holds the LM head")
        return self.lm_head.logits(hidden[batch.logits_indices])

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> torch.Tensor:
        """Logits (fp32, [len(logits_indices), vocab]) for the rows to sample."""
        return self.logits(self.model(batch, kv_caches), batch)
