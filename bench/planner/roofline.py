"""Step times of one instance on a GPU from a roofline of its published figures.

For a model (``ModelConfig``), a layout ``(tp, pp)`` and a ``Device``, a step costs

    overhead + max(max(FLOPs / (tp · peak · compute eff), bytes / (bandwidth · bw eff))
                   + TP all-reduces + pipeline sends,
                   layers · host dispatch per layer)

The last term is the host's: launches are asynchronous, so an engine that launches
each layer's kernels from Python (no CUDA graphs) is bound by them when the device's
work is short (small decode batches), and not otherwise.

- FLOPs: 2 per active parameter per token for the matmuls (MoE: the routed experts
  only; the LM head once per sequence, i.e. per decode token, and ignored in prefill
  where only the last token's logits are computed), plus causal attention:
  2·heads·head_dim·l² per layer for a prompt of l tokens, 4·heads·head_dim per layer
  per context token for one decode token.
- Bytes (per TP rank, over all stages): the weights once per step (MoE: the experts a
  batch of B tokens touches, E·(1 − (1 − k/E)^B)), plus in decode the KV of every
  context token and in prefill the KV written.
- TP: two all-reduces per layer (after attention and after the MLP, Megatron), each a
  fixed latency plus a ring's 2(tp − 1)/tp of the activations over one-way NVLink. TP
  never spans nodes (``tp`` ≤ GPUs per node).
- PP: a step is one micro-batch through all ``pp`` stages: each stage does 1/pp of the
  work, so the latency is about the same as ``pp`` = 1 at the same ``tp``, plus one
  activation send per stage boundary (over NVLink when the stages share a node, else
  the inter-node link). The pipeline keeps ``pp`` micro-batches in flight:
  throughput × pp. The simulator models that as ``pp`` independent instances each
  with 1/pp of the KV blocks (``bench/planner/evaluate.py``), as DistServe does
  ("latency about unchanged, throughput × pp").

``latency_model`` turns this into the router's ``LatencyModel`` (the linear form
the simulator runs) exactly as a real instance is profiled: the roofline "times" the
steps of ``router.latency_profile.profiling_plan`` and ``LatencyModel.fit`` fits them,
so the max() of the roofline is approximated over the range the workload uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.planner.devices import Device
from engine.layout import dtype_bytes, kv_bytes_per_token, validate_layout, weight_bytes_per_rank
from engine.model_config import ModelConfig
from router.latency_model import DecodeSample, LatencyModel, PrefillSample
from router.latency_profile import profiling_plan
from router.step_fit import Coefficients

FIT_POINTS = 6  # profiling-plan points per axis for the fit (the real profile uses 4)
PP_HOP_LATENCY_S = 10e-6  # one point-to-point send's fixed cost (NCCL, assumed)


@dataclass(frozen=True)
class Layout:
    """An instance's ``tp`` × ``pp`` workers."""

    tp: int
    pp: int

    @property
    def workers(self) -> int:
        """Workers (GPUs) of one instance."""
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp{self.tp}xpp{self.pp}"


def _active_params_per_token(cfg: ModelConfig) -> tuple[float, float]:
    """``(decoder params, LM head params)`` one token multiplies through (MoE: router
    plus the ``k`` routed experts)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_heads * d + 2 * cfg.num_kv_heads * d) + cfg.num_heads * d * h
    total = 0.0
    for layer in range(cfg.num_layers):
        if cfg.is_moe_layer(layer):
            mlp = h * cfg.num_experts + cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
        else:
            mlp = 3 * h * cfg.intermediate_size
        total += attn + mlp
    return total, float(h * cfg.vocab_size)


class Roofline:
    """Step seconds of one instance of ``layout`` on ``device`` (see the module doc);
    ``across_nodes``: its pipeline stages sit on different nodes (default: only when
    the instance is larger than a node)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layout: Layout,
        device: Device,
        dtype: str,
        across_nodes: bool | None = None,
    ):
        if not device.roofline:
            raise ValueError(f"device {device.name!r} has no roofline: measure its step times")
        if layout.tp > device.gpus_per_node:
            raise ValueError(
                f"tp={layout.tp} spans nodes of {device.gpus_per_node} GPUs "
                "(tensor parallelism stays inside one node)"
            )
        validate_layout(cfg, layout.tp, layout.pp)
        self.cfg, self.layout, self.device = cfg, layout, device
        tp, pp, nbytes = layout.tp, layout.pp, dtype_bytes(dtype)
        calib = device.calibration
        self.compute_s_per_flop = 1.0 / (tp * device.flops * calib.compute_efficiency)
        self.read_s_per_byte = 1.0 / (device.memory_bandwidth * calib.bandwidth_efficiency)
        stages = [weight_bytes_per_rank(cfg, dtype, tp, pp, i) for i in range(pp)]
        emb = -(-cfg.vocab_size // tp) * cfg.hidden_size * nbytes  # gathered, not read
        weights = sum(stages) - (0 if cfg.tie_word_embeddings and pp == 1 else emb)
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        self.expert_bytes = (
            moe_layers * cfg.num_experts * 3 * cfg.hidden_size * (cfg.moe_intermediate_size // tp)
        ) * nbytes
        self.dense_bytes = weights - self.expert_bytes
        self.kv_bytes = kv_bytes_per_token(cfg, dtype, tp)  # per rank, all layers
        self.decoder_params, self.head_params = _active_params_per_token(cfg)
        self.attn_width = cfg.num_layers * cfg.num_heads * cfg.head_dim
        self.act_bytes = cfg.hidden_size * nbytes  # one token's activations
        self._tp_fixed = 2 * cfg.num_layers * calib.allreduce_latency_s if tp > 1 else 0.0
        ring = 2 * (tp - 1) / tp
        self._tp_per_token = 2 * cfg.num_layers * ring * self.act_bytes / device.nvlink_one_way
        if across_nodes is None:  # packed: stages leave the node only when they must
            across_nodes = layout.workers > device.gpus_per_node
        hop_bw = device.internode_one_way if across_nodes else device.nvlink_one_way
        self._pp_fixed = (pp - 1) * PP_HOP_LATENCY_S
        self._pp_per_token = (pp - 1) * self.act_bytes / hop_bw
        self.overhead_s = calib.step_overhead_s
        self.dispatch_s = cfg.num_layers * calib.layer_dispatch_s

    def weights_read(self, tokens: int) -> float:
        """Weight bytes (per rank, all stages) a step over ``tokens`` tokens reads: the
        dense weights, and of the experts those the tokens are routed to (expected)."""
        if not self.expert_bytes:
            return float(self.dense_bytes)
        k, e = self.cfg.num_experts_per_tok, self.cfg.num_experts
        touched = 1.0 - (1.0 - k / e) ** tokens
        return self.dense_bytes + self.expert_bytes * touched

    def _step(self, tokens: int, flops: float, nbytes: float) -> float:
        core = max(flops * self.compute_s_per_flop, nbytes * self.read_s_per_byte)
        comm = self._tp_fixed + self._pp_fixed + tokens * (self._tp_per_token + self._pp_per_token)
        return self.overhead_s + max(core + comm, self.dispatch_s)

    def prefill_seconds(self, lengths: Sequence[int]) -> float:
        """One prefill step over prompts (chunks) of ``lengths`` uncached tokens."""
        t = sum(lengths)
        if t <= 0:
            return 0.0
        flops = 2 * self.decoder_params * t + 2 * self.attn_width * sum(n * n for n in lengths)
        nbytes = self.weights_read(t) + t * self.kv_bytes
        return self._step(t, flops, nbytes)

    def decode_seconds(self, batch_size: int, context_tokens: int) -> float:
        """One decode step of ``batch_size`` sequences holding ``context_tokens``."""
        if batch_size <= 0:
            return 0.0
        flops = 2 * (self.decoder_params + self.head_params) * batch_size
        flops += 4 * self.attn_width * context_tokens
        nbytes = self.weights_read(batch_size) + context_tokens * self.kv_bytes
        return self._step(batch_size, flops, nbytes)

    def prior(self) -> tuple[Coefficients, Coefficients]:
        """Closed-form coefficients (memory and compute terms added, not max'ed): the
        fit's anchor, an upper bound of the roofline."""
        read, comp = self.read_s_per_byte, self.compute_s_per_flop
        fixed = self.overhead_s + self.dispatch_s + self._tp_fixed + self._pp_fixed
        per_token = self._tp_per_token + self._pp_per_token
        a = fixed + self.weights_read(1 << 30) * read
        prefill = Coefficients(
            a,
            per_token + 2 * self.decoder_params * comp + self.kv_bytes * read,
            2 * self.attn_width * comp,
        )
        decode = Coefficients(
            fixed + self.weights_read(1) * read,
            self.kv_bytes * read + 4 * self.attn_width * comp,
            per_token + 2 * (self.decoder_params + self.head_params) * comp,
        )
        return prefill, decode


def latency_model(
    roof: Roofline,
    *,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    kv_capacity_tokens: int,
) -> LatencyModel:
    """The ``LatencyModel`` a profile of this instance would fit: the roofline's step
    times at the profiling plan's points for these limits (``max_model_len``: the
    longest request planned for), fitted by ``LatencyModel.fit``."""
    plan = profiling_plan(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        kv_capacity_tokens=kv_capacity_tokens,
        num_points=FIT_POINTS,
        repeats=1,
    )
    samples: list[PrefillSample | DecodeSample] = [
        PrefillSample(tuple(b), roof.prefill_seconds(b)) for b in plan.prefill_batches
    ]
    samples += [
        DecodeSample(bs, ctx, roof.decode_seconds(bs, ctx)) for bs, ctx in plan.decode_points
    ]
    model = LatencyModel(*roof.prior())
    model.fit(samples)
    return model
