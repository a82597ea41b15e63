"""A stage's dense decoder layers, batch-1 decode step, in one C call
(``single_row.c``'s ``decode_layers``).

It applies inside a single-row step (``SingleRowGemv.step``) when every layer of the
stage has a SwiGLU MLP (not MoE), there is no tensor parallelism, and weights,
activations, rope tables and KV cache are fp32 on the CPU: the same computation as
``DecoderLayer.forward`` layer after layer (qkv bias, q/k RMSNorm, rope), within fp32
rounding. Anything else returns None and the layers run their torch path.

The per-layer pointers (weights, caches, the buffers that chain one layer's output into
the next one's input) are laid out once and checked again only when a tensor moved, so
a step costs one C call plus a few numpy stores, not ~30 torch calls per layer.
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

_WEIGHTS = ("ln1", "wqkv", "bqkv", "qn", "kn", "wo", "ln2", "wgu", "wd")


def _weights(layer: DecoderLayer, mlp: MLP) -> list[torch.Tensor | None]:
    attn = layer.self_attn
    q_norm, k_norm = attn.q_norm, attn.k_norm
    return [
        layer.input_layernorm.weight,
        attn.qkv_proj.weight,
        attn.qkv_proj.bias,
        None if q_norm is None else q_norm.weight,
        None if k_norm is None else k_norm.weight,
        attn.o_proj.weight,
        layer.post_attention_layernorm.weight,
        mlp.gate_up_proj.weight,
        mlp.down_proj.weight,
    ]


def _shape(layer: DecoderLayer, mlp: MLP) -> tuple[object, ...] | None:
    """What the C loop takes from the first layer for all of them; None when the
    layer's norms differ in eps or its rotary tables are not half-width."""
    a = layer.self_attn
    norms = (layer.input_layernorm, layer.post_attention_layernorm, a.q_norm, a.k_norm)
    eps = {n.eps for n in norms if n is not None}
    if len(eps) != 1 or a.rotary.cos.shape[-1] * 2 != a.head_dim:
        return None
    return (*eps, a.scale, a.num_heads, a.num_kv_heads, a.head_dim, id(a.rotary), mlp.local_inter)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class FusedDecodeStack:
    """Runs ``layers`` (dense ``DecoderLayer``s sharing shapes, eps and rotary) through
    ``single_row.decode_layers``."""

    def __init__(self, layers: list[DecoderLayer], mlps: list[MLP]):
        first = layers[0].self_attn
        self.layers, self.rotary = layers, first.rotary
        # held, not looked up per step: loading and ``.to()`` change a parameter's
        # storage (caught by the pointer check below), not the parameter object
        self.weights = [w for pair in zip(layers, mlps, strict=True) for w in _weights(*pair)]
        self.eps, self.scale = layers[0].input_layernorm.eps, first.scale
        self.hidden = layers[0].input_layernorm.weight.shape[0]
        self.nh, self.nkv, self.d = first.num_heads, first.num_kv_heads, first.head_dim
        self.inter = mlps[0].local_inter
        n, hid = len(layers), self.hidden
        self.ptrs = np.zeros((n, len(P)), dtype=np.int64)
        self.dims = np.zeros((n, len(D)), dtype=np.int64)
        self.dims[:, [D[k] for k in ("hidden", "nh", "nkv", "d", "inter")]] = [
            hid, self.nh, self.nkv, self.d, self.inter
        ]  # fmt: skip
        self.dims[1:, D["has_res"]] = 1
        # layer i writes pair i % 2 (out, res_out), which layer i + 1 reads as (x, res)
        self.chain = torch.empty(2, 2, hid, dtype=torch.float32)
        qkv = (self.nh + 2 * self.nkv) * self.d
        self.scratch = torch.empty(2 * hid + qkv + self.nh * self.d + 2 * self.inter)
        self.laid_out: list[int] | None = None  # the tensor pointers of the last layout

    def _lay_out(self, kv_caches: list[KVCache]) -> bool:
        """Fills the static pointers; whether every tensor suits the C layer. Redone
        only when a weight or cache tensor moved since the last step."""
        if len(kv_caches) != len(self.layers):
            return False  # the torch path names the mismatch
        rope = (self.rotary.cos, self.rotary.sin)
        tensors = [*self.weights, *(t for kv in kv_caches for t in kv), *rope]
        key = [_ptr(t) for t in tensors]
        if key == self.laid_out:
            return True
        self.laid_out = None
        kv_shape = (self.nkv, self.d)
        if not single_row.fp32_cpu(*tensors) or any(
            k.shape[2:] != kv_shape or v.shape != k.shape for k, v in kv_caches
        ):
            return False
        w = np.array(key[: len(self.weights)], dtype=np.int64).reshape(len(self.layers), -1)
        self.ptrs[:, [P[name] for name in _WEIGHTS]] = w
        self.ptrs[:, P["kc"]] = [k.data_ptr() for k, _ in kv_caches]
        self.ptrs[:, P["vc"]] = [v.data_ptr() for _, v in kv_caches]
        self.ptrs[:, P["scratch"]] = self.scratch.data_ptr()
        chain = [(o.data_ptr(), r.data_ptr()) for o, r in self.chain]
        for i in range(len(self.layers) - 1):
            self.ptrs[i, [P["out"], P["res_out"]]] = chain[i % 2]
            self.ptrs[i + 1, [P["x"], P["res"]]] = chain[i % 2]
        nb, bs = kv_caches[0][0].shape[:2]
        self.dims[:, D["nb"]], self.dims[:, D["bs"]] = nb, bs
        self.laid_out = key
        return True

    def __call__(
        self,
        batch: ForwardBatch,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_caches: list[KVCache],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(last layer's mlp output, residual)`` as running the layers one by one
        returns them, or None where the fused path does not apply (see the module
        docstring). ValueError when the step's slot, context length or block table
        point outside the cache."""
        lib = single_row.library()
        if lib is None or not gemv.active() or x.shape != (1, self.hidden):
            return None
        step = single_row.step_inputs(batch)
        if (
            step is None
            or step.position >= self.rotary.cos.shape[0]
            or not single_row.fp32_cpu(x, residual)
            or not self._lay_out(kv_caches)
        ):
            return None
        return self._run(lib, step, x, residual)

    def _run(
        self, lib: object, step: StepInputs, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        ptrs, dims = self.ptrs, self.dims
        ptrs[0, [P["x"], P["res"]]] = x.data_ptr(), _ptr(residual)
        ptrs[-1, [P["out"], P["res_out"]]] = out.data_ptr(), res_out.data_ptr()
        half = self.d // 2 * 4  # bytes of one position's row of the half-width tables
        ptrs[:, P["cos"]] = self.rotary.cos.data_ptr() + step.position * half
        ptrs[:, P["sin"]] = self.rotary.sin.data_ptr() + step.position * half
        ptrs[:, P["table"]] = step.table.data_ptr()
        dims[0, D["has_res"]] = residual is not None
        dims[:, D["slot"]], dims[:, D["ctx"]] = step.slot, step.ctx
        dims[:, D["table_len"]] = step.table.numel()
        failed = lib.decode_layers(  # type: ignore[attr-defined]
            ptrs.ctypes.data, dims.ctypes.data, len(self.layers), self.eps, self.scale
        )
        if failed:
            nb, bs = dims[0, D["nb"]], dims[0, D["bs"]]
            raise ValueError(
                f"decode step outside the KV cache: slot {step.slot}, context {step.ctx}, "
                f"table {step.table.tolist()} for {nb} blocks of {bs}"
            )
        return out, res_out


def fused_stack(layers: list[DecoderLayer], tp_size: int) -> FusedDecodeStack | None:
    """The fused path for a stage's ``layers``, or None where it never applies (any MoE
    MLP, tensor parallelism: the C layer has no all-reduce; no layers)."""
    from engine.model import MLP

    mlps = [layer.mlp for layer in layers]
    if tp_size != 1 or not layers or not all(isinstance(m, MLP) for m in mlps):
        return None
    dense = [m for m in mlps if isinstance(m, MLP)]
    shapes = {_shape(layer, mlp) for layer, mlp in zip(layers, dense, strict=True)}
    if len(shapes) != 1 or None in shapes:
        return None  # the C loop runs every layer with the first one's sizes and eps
    return FusedDecodeStack(layers, dense)
