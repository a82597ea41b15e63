"""Disaggregated against colocated on the same workers and the same requests: the
systems ``pdserve bench compare`` runs, and the figures it reports (no I/O here).

Three systems share ``workers`` single-worker instances (tp = pp = 1):

- ``colocated-chunked``: every instance prefills and decodes in the same steps,
  prompts chunked under a token budget (``chunk_size``; Sarathi / vLLM's default);
- ``colocated``: the same without chunking (a whole prompt joins a step);
- ``disagg-P:D``: P prefill and D decode instances (P + D <= workers), P:D chosen
  by the planner (``bench.planner``) for these SLOs unless given.

Goodput comes from a rate sweep: the attainment points are measured once per rate and
read against every SLO; the goodput is where the attainment curve crosses the target,
interpolated linearly between the last rate that met it and the first that did not.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.metrics import SLO, RequestRecord, attainment, latency_stats, per_worker
from router.config import ServeConfig

COLOCATED_CHUNKED = "colocated-chunked"
COLOCATED = "colocated"


@dataclass(frozen=True)
class System:
    """One deployment of the comparison: its label and its ``ServeConfig``."""

    name: str
    config: ServeConfig

    @property
    def workers(self) -> int:
        """Workers it uses: Σ instances · tp · pp."""
        pools = (
            [self.config.decode]
            if self.config.colocated
            else [
                self.config.prefill,
                self.config.decode,
            ]
        )
        return sum(p.num_instances * p.tp * p.pp for p in pools)


def disagg_name(num_prefill: int, num_decode: int) -> str:
    return f"disagg-{num_prefill}:{num_decode}"


def systems(base: ServeConfig, workers: int, pd: tuple[int, int], chunk_size: int) -> list[System]:
    """The colocated baselines on ``workers`` instances and the disaggregated deployment
    of ``pd`` = (prefill, decode) instances. ValueError unless both counts are >= 1 and
    fit in ``workers``, and chunk_size >= 1."""
    num_prefill, num_decode = pd
    if min(pd) < 1 or num_prefill + num_decode > workers:
        raise ValueError(
            f"P:D must have P, D >= 1 and P + D <= workers={workers}, got "
            f"{num_prefill}:{num_decode}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    one = {"prefill.tp": 1, "prefill.pp": 1, "decode.tp": 1, "decode.pp": 1}
    colocated = {**one, "prefill.num_instances": 0, "decode.num_instances": workers}
    chunked = {"decode.chunked_prefill": True, "decode.max_num_batched_tokens": chunk_size}
    disagg = {"prefill.num_instances": num_prefill, "decode.num_instances": num_decode}
    return [
        System(COLOCATED_CHUNKED, base.with_overrides(**colocated, **chunked)),
        System(COLOCATED, base.with_overrides(**colocated, **{"decode.chunked_prefill": False})),
        System(disagg_name(num_prefill, num_decode), base.with_overrides(**one, **disagg)),
    ]


def sweep_goodput(points: Sequence[tuple[float, float]], target: float) -> tuple[float, str]:
    """(goodput, status) from ``(rate, attainment)`` points: the rate where attainment
    crosses ``target``, linear between the last rate meeting it and the first that
    does not (``found``); the highest rate when all meet it (``at_hi``: goodput is at
    least that); 0 when the lowest misses (``below_lo``)."""
    if not points:
        raise ValueError("no (rate, attainment) points")
    pts = sorted(points)
    if pts[0][1] < target:
        return 0.0, "below_lo"
    for (r0, a0), (r1, a1) in itertools.pairwise(pts):
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1), "found"
    return pts[-1][0], "at_hi"


def slo_label(slo: SLO) -> str:
    return f"TTFT {slo.ttft_s * 1e3:g} ms, TPOT {slo.tpot_s * 1e3:g} ms"


def system_figures(
    runs: Mapping[float, Sequence[RequestRecord]], slos: Sequence[SLO], workers: int, target: float
) -> dict[str, Any]:
    """One system's figures from its runs (rate -> records): per SLO the attainment at
    each rate, goodput and per-worker goodput; per rate TTFT and TPOT p50/p90/p99."""
    per_slo = []
    for slo in slos:
        points = [(rate, attainment(records, slo)) for rate, records in sorted(runs.items())]
        rate, status = sweep_goodput(points, target)
        per_slo.append(
            {
                "slo": slo.to_json(),
                "attainment": points,
                "goodput": rate,
                "status": status,
                "per_worker": per_worker(rate, workers),
            }
        )
    latency = {}
    for rate, records in sorted(runs.items()):
        ok = [r for r in records if r.ok]
        latency[rate] = {
            "ttft_ms": latency_stats([t for r in ok if (t := r.ttft_s) is not None]),
            "tpot_ms": latency_stats([t for r in ok if (t := r.tpot_s) is not None]),
        }
    return {"workers": workers, "slos": per_slo, "latency": latency}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def goodput_table(figures: Mapping[str, Mapping[str, Any]], slo_index: int) -> str:
    """Per system: goodput, per-worker goodput and attainment at each rate for one SLO."""
    first = next(iter(figures.values()))["slos"][slo_index]
    rates = [r for r, _ in first["attainment"]]
    head = f"{'system':<20}{'goodput':>9}{'/worker':>9}" + "".join(f"{r:>8g}" for r in rates)
    lines = [head, "-" * len(head)]
    for name, fig in figures.items():
        s = fig["slos"][slo_index]
        mark = "≥" if s["status"] == "at_hi" else " "
        cells = "".join(f"{100 * a:7.0f}%" for _, a in s["attainment"])
        lines.append(f"{name:<20}{mark}{s['goodput']:>8.2f}{s['per_worker']:>9.2f}{cells}")
    return "\n".join(lines)


def latency_table(figures: Mapping[str, Mapping[str, Any]]) -> str:
    """Per system and rate: TTFT and TPOT p50/p90/p99 in milliseconds."""
    head = f"{'system':<20}{'rate':>6}  {'TTFT p50/p90/p99 ms':>22}  {'TPOT p50/p90/p99 ms':>21}"
    lines = [head, "-" * len(head)]
    for name, fig in figures.items():
        for rate, lat in fig["latency"].items():
            t, p = lat["ttft_ms"], lat["tpot_ms"]
            ttft = "/".join(_ms(t[k]) for k in ("p50", "p90", "p99"))
            tpot = "/".join(_ms(p[k]) for k in ("p50", "p90", "p99"))
            lines.append(f"{name:<20}{rate:>6g}  {ttft:>22}  {tpot:>21}")
    return "\n".join(lines)
