"""Cheap upper bounds of one instance's rate per phase (req/s), from its latency model
alone: the planner ranks layouts and placements by them before simulating any.

- Prefill: the instance is never idle and packs prompts into full token budgets, so a
  prompt costs its share of the fixed term plus its own per-token and quadratic terms;
  the rate is ``pp`` over the mean cost. 0 when more than ``1 − target`` of the
  prompts cannot meet the TTFT SLO even alone.
- Decode: the largest batch whose step meets the TPOT SLO and whose KV fits (every
  sequence at its mean context) decodes ``batch`` tokens per step; a request needs its
  mean output length of steps. 0 when even one sequence misses the TPOT SLO.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.metrics import SLO
from bench.planner.sizing import SizedLayout


def _chunks(length: int, budget: int) -> list[int]:
    full, rest = divmod(length, budget)
    return [budget] * full + ([rest] if rest else [])


def prefill_bound(
    sized: SizedLayout, lengths: Sequence[tuple[int, int]], slo: SLO, target: float
) -> float:
    """Upper bound of one prefill instance's rate (req/s) on these requests."""
    model, budget = sized.latency, sized.max_num_batched_tokens
    coef = model.prefill.coefficients
    alone_ok = 0
    cost = 0.0
    for prompt, _ in lengths:
        chunks = _chunks(prompt, budget)
        alone = sum(model.predict_prefill([c]) for c in chunks)
        alone_ok += alone <= slo.ttft_s
        cost += coef.a * prompt / budget + coef.b * prompt + coef.c * sum(c * c for c in chunks)
    if alone_ok < target * len(lengths):
        return 0.0
    return sized.layout.pp * len(lengths) / cost


def decode_bound(sized: SizedLayout, lengths: Sequence[tuple[int, int]], slo: SLO) -> float:
    """Upper bound of one decode instance's rate (req/s) on these requests."""
    n = len(lengths)
    mean_ctx = sum(p + o / 2 for p, o in lengths) / n
    mean_out = sum(o for _, o in lengths) / n
    capacity = sized.kv_blocks // sized.layout.pp * sized.block_size
    best = 0.0
    for batch in range(1, sized.max_num_seqs + 1):
        if batch * mean_ctx > capacity:
            break
        step = sized.latency.predict_decode(batch, round(batch * mean_ctx))
        if step > slo.tpot_s:
            break
        best = max(best, batch / (mean_out * step))
    return sized.layout.pp * best
