"""Layouts (tp, pp) and memory sizing from a model's shape alone (no torch).

Everything here is computed analytically from ``ModelConfig`` exactly as ``engine.model``
shards the weights (Megatron-style TP, PP stages from ``engine.stages``), so ``pdserve plan memory``
can size a deployment for a device that is not attached, and the engine sizes its KV
pool at start-up with the same KV formula (``engine.memory`` calls into this module).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.model_config import DTYPE_BYTES, ModelConfig
from engine.stages import stage_layers as stage_layers  # re-exported
from engine.units import format_bytes as format_bytes  # re-exported
from engine.units import parse_bytes as parse_bytes  # re-exported


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (float32, bfloat16, float16); ValueError otherwise."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {sorted(DTYPE_BYTES)})")
    return DTYPE_BYTES[dtype]


def plan_dtype(cfg: ModelConfig, dtype: str) -> str:
    """``dtype``, or for "auto" the checkpoint's ``torch_dtype`` (what the target device
    runs; the planning machine is never probed)."""
    resolved = cfg.torch_dtype if dtype == "auto" else dtype
    dtype_bytes(resolved)  # names the bad dtype
    return resolved


# ---------------------------------------------------------------- layout rules


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads one TP rank holds: split over ranks, one (replicated) when tp > kv heads."""
    return max(1, cfg.num_kv_heads // tp)


def kv_bytes_per_token(cfg: ModelConfig, dtype: str, tp: int, num_layers: int | None = None) -> int:
    """K and V bytes one token takes on one rank holding ``num_layers`` layers (default:
    all). The single KV formula: the engine's pool and ``plan_memory`` both use it."""
    layers = cfg.num_layers if num_layers is None else num_layers
    return 2 * layers * kv_heads_per_rank(cfg, tp) * cfg.head_dim * dtype_bytes(dtype)


def _tp_problem(cfg: ModelConfig, tp: int) -> str | None:
    """Why ``tp`` does not shard ``cfg`` (None if it does)."""
    if tp < 1:
        return f"tp={tp} must be >= 1"
    if cfg.num_heads % tp:
        return f"tp={tp} does not divide num_attention_heads={cfg.num_heads}"
    kv = cfg.num_kv_heads
    if tp > kv and tp % kv:
        return (
            f"tp={tp} exceeds num_key_value_heads={kv} but is not a multiple of it "
            "(KV heads are only replicated whole)"
        )
    if tp <= kv and kv % tp:
        return f"tp={tp} does not divide num_key_value_heads={kv}"
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    if dense and cfg.intermediate_size % tp:
        return f"tp={tp} does not divide intermediate_size={cfg.intermediate_size}"
    if cfg.num_experts and cfg.moe_intermediate_size % tp:
        return f"tp={tp} does not divide moe_intermediate_size={cfg.moe_intermediate_size}"
    return None


def valid_tp_values(cfg: ModelConfig) -> list[int]:
    """Every tp that shards ``cfg`` (tp never exceeds the attention head count)."""
    return [tp for tp in range(1, cfg.num_heads + 1) if _tp_problem(cfg, tp) is None]


def validate_layout(
    cfg: ModelConfig, tp: int, pp: int, boundaries: Sequence[int] | None = None
) -> None:
    """ValueError saying why (tp, pp) cannot run ``cfg`` and which values can; tp must
    divide the attention heads, the KV heads (or be a multiple of them, to replicate)
    and the (expert) intermediate size; pp must be between 1 and the layer count, and
    explicit stage ``boundaries`` (``engine.stages``) must be valid layer indices."""
    problem = _tp_problem(cfg, tp)
    if problem is not None:
        valid = ", ".join(str(t) for t in valid_tp_values(cfg))
        raise ValueError(f"{problem}: valid tp values are {valid}")
    if not 1 <= pp <= cfg.num_layers:
        raise ValueError(
            f"pp={pp} is not between 1 and num_hidden_layers={cfg.num_layers} "
            f"(every stage needs a layer): valid pp values are 1 to {cfg.num_layers}"
        )
    stage_layers(cfg.num_layers, pp, boundaries)


# ---------------------------------------------------------------- weight bytes


def _layer_params(cfg: ModelConfig, layer: int, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank, as engine.model allocates them."""
    h, d = cfg.hidden_size, cfg.head_dim
    q_rows = cfg.num_heads * d // min(tp, cfg.num_heads)
    kv_rows = kv_heads_per_rank(cfg, tp) * d
    qkv_rows = q_rows + 2 * kv_rows
    n = qkv_rows * h + (qkv_rows if cfg.attention_bias else 0)
    n += h * (cfg.num_heads * d // tp)  # o_proj: row-parallel, no bias
    n += 2 * d if cfg.qk_norm else 0
    n += 2 * h  # input and post-attention norms, replicated
    if cfg.is_moe_layer(layer):
        e = cfg.num_experts
        return n + e * h + e * 3 * h * (cfg.moe_intermediate_size // tp)  # router replicated
    return n + 3 * h * (cfg.intermediate_size // tp)


def _stage_params(
    cfg: ModelConfig, tp: int, pp: int, boundaries: Sequence[int] | None = None
) -> list[int]:
    """Parameters per rank of each pipeline stage."""
    per_layer = [_layer_params(cfg, i, tp) for i in range(cfg.num_layers)]
    vocab_rows = -(-cfg.vocab_size // tp) * cfg.hidden_size  # vocab-parallel, ceil rows
    stages = [sum(per_layer[i] for i in r) for r in stage_layers(cfg.num_layers, pp, boundaries)]
    stages[0] += vocab_rows  # embedding
    # Final norm and LM head live on the last stage; a tied head shares the embedding's
    # storage only when both sit on the same (single) stage.
    stages[-1] += cfg.hidden_size
    if not (cfg.tie_word_embeddings and pp == 1):
        stages[-1] += vocab_rows
    return stages


def weight_bytes_per_rank(
    cfg: ModelConfig,
    dtype: str,
    tp: int,
    pp: int,
    pp_rank: int | None = None,
    boundaries: Sequence[int] | None = None,
) -> int:
    """Weight bytes one rank of pipeline stage ``pp_rank`` holds (None: the largest
    stage), stages split at ``boundaries`` (None: balanced). For tp=pp=1 this equals the
    model's parameter count times the dtype size. ValueError on an invalid layout or stage.
    Experts are counted as plain TP shards them (every expert at 1/tp width); expert
    parallelism holds the same bytes when ep <= tp, and E/ep whole experts per rank
    (fewer bytes) when ep > tp: this is then an upper bound."""
    validate_layout(cfg, tp, pp, boundaries)
    stages = _stage_params(cfg, tp, pp, boundaries)
    if pp_rank is None:
        return max(stages) * dtype_bytes(dtype)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} must be in [0, pp={pp})")
    return stages[pp_rank] * dtype_bytes(dtype)


# ---------------------------------------------------------------- memory plan


@dataclass(frozen=True)
class MemoryPlan:
    """How one instance of layout (tp, pp) fills devices of ``device_memory_bytes``.

    Per rank: ``weights_per_rank`` and ``kv_bytes_per_token`` are those of the largest
    pipeline stage; ``kv_blocks`` is the smallest stage's block count (every stage
    holds every block, for its own layers), ``kv_tokens`` = blocks x block size, and
    ``max_concurrent_seqs`` how many sequences of ``context_len`` tokens fit at once.
    ``fits`` is False when weights leave no KV budget or the pool cannot hold one
    sequence of ``context_len``; ``reason`` then says why and suggests a layout that fits.
    """

    tp: int
    pp: int
    dtype: str
    block_size: int
    context_len: int
    device_memory_bytes: int
    reserve: float
    budget_per_rank: int
    weights_per_rank: int
    kv_bytes_per_token: int
    kv_block_bytes: int
    kv_blocks: int
    kv_tokens: int
    blocks_per_seq: int
    max_concurrent_seqs: int
    fits: bool
    reason: str = ""


def _check_plan_args(device_memory_bytes: int, reserve: float, block_size: int, ctx: int) -> None:
    if device_memory_bytes <= 0:
        raise ValueError(f"device memory must be > 0 bytes, got {device_memory_bytes}")
    if not 0.0 <= reserve < 1.0:
        raise ValueError(f"reserve must be in [0, 1), got {reserve}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if ctx < 1:
        raise ValueError(f"context_len must be >= 1, got {ctx}")


def _plan(
    cfg: ModelConfig,
    mem: int,
    reserve: float,
    tp: int,
    pp: int,
    dtype: str,
    bs: int,
    ctx: int,
    bounds: Sequence[int] | None = None,
) -> MemoryPlan:
    """The plan of a validated layout, without a suggestion when it does not fit."""
    nbytes = dtype_bytes(dtype)
    budget = int(mem * (1.0 - reserve))
    stage_weights = [p * nbytes for p in _stage_params(cfg, tp, pp, bounds)]
    stage_kv = [
        kv_bytes_per_token(cfg, dtype, tp, len(r)) for r in stage_layers(cfg.num_layers, pp, bounds)
    ]
    blocks = min(
        max(0, budget - w) // (kv * bs) for w, kv in zip(stage_weights, stage_kv, strict=True)
    )
    per_seq = -(-ctx // bs)
    weights = max(stage_weights)
    reason = ""
    if budget <= weights:
        reason = (
            f"weights take {format_bytes(weights)} per rank but only {format_bytes(budget)} of "
            f"{format_bytes(mem)} is usable after the {reserve:.0%} reserve"
        )
    elif blocks < per_seq:
        reason = (
            f"the KV pool holds {blocks} blocks of {bs} tokens per rank but one sequence "
            f"of context_len={ctx} needs {per_seq}"
        )
    return MemoryPlan(
        tp=tp,
        pp=pp,
        dtype=dtype,
        block_size=bs,
        context_len=ctx,
        device_memory_bytes=mem,
        reserve=reserve,
        budget_per_rank=budget,
        weights_per_rank=weights,
        kv_bytes_per_token=max(stage_kv),
        kv_block_bytes=max(stage_kv) * bs,
        kv_blocks=blocks,
        kv_tokens=blocks * bs,
        blocks_per_seq=per_seq,
        max_concurrent_seqs=blocks // per_seq,
        fits=not reason,
        reason=reason,
    )


def _suggest(
    cfg: ModelConfig,
    mem: int,
    reserve: float,
    pp: int,
    dtype: str,
    bs: int,
    ctx: int,
    bounds: Sequence[int] | None = None,
) -> str:
    """The smallest tp that fits at this pp (and these stage boundaries), else the
    layout with fewest devices that fits (balanced stages)."""
    tps = valid_tp_values(cfg)
    for tp in tps:
        if _plan(cfg, mem, reserve, tp, pp, dtype, bs, ctx, bounds).fits:
            return f"the smallest tp that fits at pp={pp} is tp={tp}"
    layouts = sorted(
        ((tp, p) for tp in tps for p in range(1, cfg.num_layers + 1)),
        key=lambda lay: (lay[0] * lay[1], lay[1]),
    )
    for tp, p in layouts:
        if _plan(cfg, mem, reserve, tp, p, dtype, bs, ctx).fits:
            return f"no tp fits at pp={pp}; the smallest layout that fits is tp={tp} pp={p}"
    return "no layout fits this device; use devices with more memory or a shorter context"


def plan_memory(
    cfg: ModelConfig,
    device_memory_bytes: int,
    reserve: float,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "auto",
    block_size: int = 16,
    context_len: int | None = None,
    pp_boundaries: Sequence[int] | None = None,
) -> MemoryPlan:
    """Size the KV pool of layout (tp, pp) on devices of ``device_memory_bytes`` keeping
    ``reserve`` (a fraction) free for activations and runtime: budget per rank =
    memory x (1 - reserve) - weights. ``context_len`` defaults to the model's
    ``max_position_embeddings``; ``dtype`` "auto" is the checkpoint's; ``pp_boundaries``
    splits the stages explicitly (``engine.stages``). ValueError on a
    bad layout or argument; a layout that does not fit gives ``fits=False`` and a reason
    naming the smallest layout that would."""
    ctx = cfg.max_position_embeddings if context_len is None else context_len
    _check_plan_args(device_memory_bytes, reserve, block_size, ctx)
    dtype = plan_dtype(cfg, dtype)
    validate_layout(cfg, tp, pp, pp_boundaries)
    args = (cfg, device_memory_bytes, reserve)
    plan = _plan(*args, tp, pp, dtype, block_size, ctx, pp_boundaries)
    if plan.fits:
        return plan
    hint = _suggest(*args, pp, dtype, block_size, ctx, pp_boundaries)
    return replace(plan, reason=f"{plan.reason}; {hint}")
