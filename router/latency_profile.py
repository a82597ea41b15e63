"""The start-up profiling plan: which steps to time so that ``LatencyModel.fit`` pins
down every coefficient in a short run (no torch).

Prefill: single prompts at geometrically spaced lengths (they separate a, b and c)
plus a few batches of equal short prompts (Σl² ≠ (Σl)², so the batch is modelled, not
just the prompt). Decode: geometrically spaced batch sizes, each with short and long
contexts, so context tokens and batch size vary independently. The caller (the
controller) runs each point ``repeats`` times on a real instance, drops the first
(warm-up) run, and fits on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.latency_model import LatencyModel

SHORT_CONTEXT = 128  # tokens per sequence in the "short context" decode points
MAX_BATCH_COPIES = 8  # prompts per multi-prompt prefill batch, at most


@dataclass(frozen=True)
class ProfilingPlan:
    """Points to time: prefill batches (uncached lengths of each prompt) and decode
    steps ``(batch_size, context tokens in the batch)``, each ``repeats`` times."""

    prefill_batches: tuple[tuple[int, ...], ...]
    decode_points: tuple[tuple[int, int], ...]
    repeats: int

    def estimated_seconds(self, model: LatencyModel) -> float:
        """What the plan costs by ``model``'s prediction (steps only, no set-up)."""
        prefill = sum(model.predict_prefill(b) for b in self.prefill_batches)
        decode = sum(model.predict_decode(bs, ctx) for bs, ctx in self.decode_points)
        return self.repeats * (prefill + decode)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists)."""
        return {
            "prefill_batches": [list(b) for b in self.prefill_batches],
            "decode_points": [list(p) for p in self.decode_points],
            "repeats": self.repeats,
        }


def geometric(lo: int, hi: int, n: int) -> list[int]:
    """Up to ``n`` distinct integers from ``lo`` to ``hi`` spaced geometrically."""
    if n == 1 or hi == lo:
        return [lo]
    return sorted({round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)})


def profiling_plan(
    *,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    kv_capacity_tokens: int,
    num_points: int = 5,
    repeats: int = 3,
    min_tokens: int = 16,
) -> ProfilingPlan:
    """The plan for one instance with these limits (its token budget per step, batch
    size cap, longest sequence, and KV capacity in tokens = blocks × block_size).
    ``num_points`` lengths / batch sizes per axis. ValueError naming a bad limit."""
    limits = {
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        "kv_capacity_tokens": kv_capacity_tokens,
        "repeats": repeats,
        "min_tokens": min_tokens,
    }
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_points < 3:
        raise ValueError(f"num_points must be >= 3 (three coefficients), got {num_points}")
    longest = min(max_model_len, max_num_batched_tokens, kv_capacity_tokens)
    if longest < min_tokens:
        raise ValueError(
            f"the longest prompt chunk ({longest} tokens) is below min_tokens ({min_tokens})"
        )
    lengths = geometric(min_tokens, longest, num_points)
    prefill: list[tuple[int, ...]] = [(n,) for n in lengths]
    for n in lengths[: (len(lengths) + 1) // 2]:
        copies = min(MAX_BATCH_COPIES, max_num_seqs, max_num_batched_tokens // n)
        copies = min(copies, kv_capacity_tokens // n)
        if copies >= 2:
            prefill.append((n,) * copies)
    decode: list[tuple[int, int]] = []
    short = min(SHORT_CONTEXT, max_model_len)
    for bs in geometric(1, max_num_seqs, num_points):
        long = min(max_model_len, kv_capacity_tokens // bs)
        for per_seq in sorted({short, long}):
            if per_seq >= 1 and bs * per_seq <= kv_capacity_tokens:
                decode.append((bs, bs * per_seq))
    if not decode:
        raise ValueError(f"kv_capacity_tokens {kv_capacity_tokens} holds no decode batch")
    return ProfilingPlan(tuple(prefill), tuple(decode), repeats)
