"""A dense decoder layer's batch-1 decode step in one C call (``single_row.c``).

It applies inside a single-row step (``SingleRowGemv.step``) to a layer with a SwiGLU
MLP (not MoE) and no tensor parallelism, when weights, activations and KV cache are
fp32 on the CPU: the same computation as ``DecoderLayer.forward`` (qkv bias, q/k
RMSNorm and the rope tables included), within fp32 rounding. Anything else returns
None and the layer runs its torch path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine import gemv, single_row
from engine.single_row import D, P, StepInputs

if TYPE_CHECKING:
    from engine.forward_batch import ForwardBatch
    from engine.model import MLP, DecoderLayer, KVCache


class FusedDecodeLayer:
    """Runs ``layer`` (a dense ``DecoderLayer``) through ``single_row.decode_layer``."""

    def __init__(self, layer: DecoderLayer, mlp: MLP):
        attn = layer.self_attn
        self.attn, self.eps = attn, layer.input_layernorm.eps
        self.hidden = layer.input_layernorm.weight.shape[0]
        self.inter = mlp.local_inter
        q_norm, k_norm = attn.q_norm, attn.k_norm
        self.weights: dict[str, torch.Tensor | None] = {
            "ln1": layer.input_layernorm.weight,
            "wqkv": attn.qkv_proj.weight,
            "bqkv": attn.qkv_proj.bias,
            "qn": None if q_norm is None else q_norm.weight,
            "kn": None if k_norm is None else k_norm.weight,
            "wo": attn.o_proj.weight,
            "ln2": layer.post_attention_layernorm.weight,
            "wgu": mlp.gate_up_proj.weight,
            "wd": mlp.down_proj.weight,
        }
        self.ptrs = np.zeros(len(P), dtype=np.int64)
        self.dims = np.zeros(len(D), dtype=np.int64)
        self.scratch: torch.Tensor | None = None

    def _scratch(self, hidden: int) -> torch.Tensor:
        if self.scratch is None:
            a = self.attn
            q = a.num_heads * a.head_dim
            size = 2 * hidden + q + (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
            self.scratch = torch.empty(size + 2 * self.inter, dtype=torch.float32)
        return self.scratch

    def __call__(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        kv: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(mlp output, residual)`` as ``DecoderLayer.forward`` returns them, or None
        where the fused path does not apply (see the module docstring). ValueError when
        the step's slot, context length or block table point outside the cache."""
        lib = single_row.library()
        if lib is None or not gemv.active():
            return None
        rotary = self.attn.rotary
        rope = batch.memo("rope", lambda: rotary.tables(positions))
        step: StepInputs | None = batch.memo(
            "single_row", lambda: single_row.step_inputs(batch, rope)
        )
        a = self.attn
        shapes = (x.shape, kv[0].shape[2:]) == ((1, self.hidden), (a.num_kv_heads, a.head_dim))
        if (
            step is None
            or not shapes
            or not single_row.fp32_cpu(x, residual, *kv, *self.weights.values())
        ):
            return None
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        tensors = {
            "x": x,
            "res": residual,
            "out": out,
            "res_out": res_out,
            "kc": kv[0],
            "vc": kv[1],
        }
        tensors |= {"cos": step.cos, "sin": step.sin, "table": step.table}
        tensors |= {"scratch": self._scratch(self.hidden), **self.weights}
        self.ptrs[:] = [0 if (t := tensors[n]) is None else t.data_ptr() for n in P]
        nb, bs = kv[0].shape[:2]
        self.dims[:] = [residual is not None, self.hidden, a.num_heads, a.num_kv_heads,
                        a.head_dim, self.inter, step.slot, step.ctx, nb, bs,
                        step.table.numel()]  # fmt: skip
        if lib.decode_layer(self.ptrs.ctypes.data, self.dims.ctypes.data, self.eps, a.scale):
            raise ValueError(
                f"decode step outside the KV cache: slot {step.slot}, context {step.ctx}, "
                f"table {step.table.tolist()} for {nb} blocks of {bs}"
            )
        return out, res_out


def fused_layer(layer: DecoderLayer, tp_size: int) -> FusedDecodeLayer | None:
    """The fused path for ``layer``, or None where it never applies (an MoE MLP, tensor
    parallelism: the C layer has no all-reduce)."""
    from engine.model import MLP

    if tp_size != 1 or not isinstance(layer.mlp, MLP):
        return None
    return FusedDecodeLayer(layer, layer.mlp)
