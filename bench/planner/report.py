"""The planner's answer for people (``format_result``) and programs (``result_json``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from bench.planner.placements import ALGORITHM, BOTH, Placement
from bench.planner.search import PlanResult
from engine.layout import format_bytes

COLUMNS = (
    ("#", ">"),
    ("algorithm", "<"),
    ("prefill", "<"),
    ("P", ">"),
    ("decode", "<"),
    ("D", ">"),
    ("workers", ">"),
    ("goodput", ">"),
    ("/worker", ">"),
    ("TTFT p95", ">"),
    ("TPOT p95", ">"),
    ("bound by", "<"),
)


def _bytes_s(rate: float) -> str:
    return f"{rate / 1e9:,.0f} GB/s" if rate >= 1e9 else f"{rate / 1e6:,.0f} MB/s"


def shown(result: PlanResult, top: int) -> list[Placement]:
    """The ``top`` best, plus the best of each algorithm not among them."""
    out = result.placements[:top]
    for p in result.placements[top:]:
        if not any(o.candidate.affinity in (p.candidate.affinity, BOTH) for o in out):
            out.append(p)
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def _row(rank: int, p: Placement) -> list[str]:
    c = p.candidate
    goodput = f"{p.goodput:.2f}" + ("+" if p.status == "at_hi" else "")
    return [
        str(rank),
        ALGORITHM[c.affinity],
        str(c.prefill),
        str(c.num_prefill),
        str(c.decode),
        str(c.num_decode),
        str(p.workers),
        goodput,
        f"{p.per_worker:.3f}",
        _ms(p.ttft_p95_s),
        _ms(p.tpot_p95_s),
        p.bound_by,
    ]


def format_table(placements: list[Placement]) -> str:
    """The placements as an aligned table (goodput in req/s)."""
    rows = [[name for name, _ in COLUMNS]] + [_row(i, p) for i, p in enumerate(placements, 1)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            f"{cell:{align}{w}}" for cell, (_, align), w in zip(r, COLUMNS, widths, strict=True)
        )
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _link(result: PlanResult, link: str) -> str:
    """The KV link's name; on a measured device (cpu) workers talk over gloo."""
    return link if result.spec.device.roofline else "gloo between worker processes"


def why(result: PlanResult) -> str:
    """Why the best placement wins: the phase that bounds it, each pool's capacity
    alone, the latencies at its goodput and the runner-up."""
    best, slo = result.placements[0], result.spec.slo
    c = best.candidate
    lines = [
        f"why: {best.bound_by}-bound. {c.num_prefill} prefill instance(s) sustain "
        f"{best.prefill_capacity:.1f} req/s alone (TTFT <= {_ms(slo.ttft_s)} for "
        f"{result.spec.target:.0%}), {c.num_decode} decode instance(s) "
        f"{best.decode_capacity:.1f} req/s (batches up to {best.max_num_seqs} within "
        f"TPOT {_ms(slo.tpot_s)} and their KV).",
        f"     At {best.goodput:.2f} req/s: {best.attainment:.0%} attain both SLOs; TTFT p95 "
        f"{_ms(best.ttft_p95_s)}, TPOT p95 {_ms(best.tpot_p95_s)}; KV moves over "
        f"{_link(result, c.link)} at {_bytes_s(best.bandwidth_bytes_s)}; prefill budget "
        f"{best.max_num_batched_tokens} tokens per step.",
    ]
    if len(result.placements) > 1:
        nxt = result.placements[1]
        gap = (best.goodput - nxt.goodput) / best.goodput if best.goodput else 0.0
        lines.append(
            f"     Runner-up {nxt.candidate} ({ALGORITHM[nxt.candidate.affinity]}): "
            f"{nxt.goodput:.2f} req/s ({gap:.1%} less), {nxt.per_worker:.3f} per worker."
        )
    return "\n".join(lines)


def _header(result: PlanResult) -> str:
    spec = result.spec
    cfg, dev = spec.cfg, spec.device
    prompts = [p for p, _ in spec.lengths]
    outputs = [o for _, o in spec.lengths]
    steps = "roofline" if spec.measured is None else "measured latency model"
    return "\n".join(
        [
            f"model    {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{spec.dtype}",
            f"cluster  {spec.workers} x {dev.name} ({format_bytes(dev.memory_bytes)}, "
            f"{dev.gpus_per_node} per node), step times: {steps}"
            + (f" [{dev.calibration.source}]" if spec.measured is None else ""),
            f"SLO      TTFT {_ms(spec.slo.ttft_s)}, TPOT {_ms(spec.slo.tpot_s)}, "
            f"{spec.target:.0%} attainment",
            f"requests {len(spec.lengths)} per simulation, mean prompt "
            f"{sum(prompts) / len(prompts):.0f} / output {sum(outputs) / len(outputs):.0f} "
            f"tokens, longest {spec.longest}",
            f"search   {len(result.layouts)} layouts ({len(result.rejected)} do not fit), "
            f"{result.simulations} simulations, {result.wall_s:.1f} s",
        ]
    )


def format_result(result: PlanResult, top: int) -> str:
    """Header, the ``top`` placements and why the best wins."""
    if not result.placements or result.placements[0].goodput <= 0:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(result.rejected.items())[:3])
        return f"{_header(result)}\n\nno placement meets the SLOs. {reasons}"
    return f"{_header(result)}\n\n{format_table(shown(result, top))}\n\n{why(result)}"


def result_json(result: PlanResult, top: int) -> dict[str, Any]:
    """The result as plain data: the request, the placements ``shown``, the rejections."""
    spec = result.spec
    return {
        "device": spec.device.name,
        "workers": spec.workers,
        "dtype": spec.dtype,
        "slo": spec.slo.to_json(),
        "target": spec.target,
        "num_requests": len(spec.lengths),
        "longest_request": spec.longest,
        "calibration": None if spec.measured is not None else asdict(spec.device.calibration),
        "placements": [p.to_dict() for p in shown(result, top)],
        "rejected_layouts": result.rejected,
        "layouts_considered": len(result.layouts),
        "simulations": result.simulations,
        "wall_s": result.wall_s,
    }
