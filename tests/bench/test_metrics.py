"""DistServe's metrics against hand-computed cases (bench/metrics.py), and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.metrics import (
    SLO,
    RequestRecord,
    attainment,
    attainment_vs_scale,
    goodput,
    latency_stats,
    meets_slo,
    min_slo_scale,
    per_worker,
    percentile,
    phase_breakdown,
    summarize,
)
from bench.plots import plot_attainment_vs_rate, plot_attainment_vs_scale, plot_phase_breakdown

SLO_1 = SLO(ttft_s=0.5, tpot_s=0.1)


def rec(
    arrival: float,
    tokens: list[float],
    status: str = "ok",
    index: int = 0,
    timings: dict[str, float] | None = None,
) -> RequestRecord:
    """A record whose first token is ``tokens[0]`` and which finishes at the last."""
    return RequestRecord(
        index=index,
        arrival_s=arrival,
        first_token_s=tokens[0] if tokens else None,
        token_times=tokens,
        finish_s=tokens[-1] if tokens else None,
        status=status,
        prompt_len=8,
        output_len=len(tokens),
        timings=timings or {},
        sent_s=arrival,
    )


def test_ttft_and_tpot_by_hand() -> None:
    r = rec(1.0, [1.25, 1.35, 1.55, 1.85])
    assert r.ttft_s == pytest.approx(0.25)
    assert r.tpot_s == pytest.approx(0.6 / 3)  # (last − first) / (n − 1)
    assert r.e2e_s == pytest.approx(0.85)


def test_one_token_output_has_zero_tpot_and_meets_any_tpot_slo() -> None:
    r = rec(0.0, [0.2])
    assert r.tpot_s == 0.0
    assert meets_slo(r, SLO(ttft_s=0.3, tpot_s=1e-9))
    assert not meets_slo(r, SLO(ttft_s=0.1, tpot_s=1.0))  # TTFT still counts


def test_failed_request_misses_whatever_its_times() -> None:
    r = rec(0.0, [0.01, 0.02], status="DEADLINE_EXCEEDED")
    assert r.ttft_s == pytest.approx(0.01) and r.tpot_s is None and r.e2e_s is None
    assert not meets_slo(r, SLO(10.0, 10.0))
    never = rec(0.0, [], status="UNAVAILABLE")
    assert never.ttft_s is None and not meets_slo(never, SLO(10.0, 10.0))


def test_attainment_needs_both_slos() -> None:
    records = [
        rec(0.0, [0.4, 0.45, 0.5]),  # TTFT 0.4, TPOT 0.05: meets both
        rec(0.0, [0.6, 0.65]),  # TTFT 0.6 > 0.5: misses on TTFT alone
        rec(0.0, [0.1, 0.3, 0.5]),  # TPOT 0.2 > 0.1: misses on TPOT alone
        rec(0.0, [0.1, 0.15], status="RESOURCE_EXHAUSTED"),  # failed
    ]
    assert attainment(records, SLO_1) == 0.25
    s = summarize(records, SLO_1)
    assert s["attainment"] == 0.25
    assert s["ttft_attainment"] == 0.5 and s["tpot_attainment"] == 0.5
    assert s["num_ok"] == 3 and s["statuses"] == {"ok": 3, "RESOURCE_EXHAUSTED": 1}
    with pytest.raises(ValueError, match="no request records"):
        attainment([], SLO_1)


def test_percentiles_by_hand() -> None:
    xs = [float(x) for x in range(10, 0, -1)]  # 10..1, unsorted
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile([3.0], 99) == 3.0
    rng = np.random.default_rng(0)
    ys = rng.exponential(1.0, 101).tolist()
    for q in (0, 37.5, 50, 90, 99, 100):
        assert percentile(ys, q) == pytest.approx(np.percentile(ys, q))
    with pytest.raises(ValueError, match="q must be in \\[0, 100\\], got 101"):
        percentile(xs, 101)
    stats = latency_stats([0.001, 0.002, 0.003])  # seconds in, ms out
    assert stats == pytest.approx({"mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98})
    assert latency_stats([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_phase_breakdown_means_over_ok_requests() -> None:
    records = [
        rec(0, [1.0], timings={"queue_ms": 1, "prefill_ms": 10, "transfer_ms": 2, "decode_ms": 30}),
        rec(0, [1.0], timings={"queue_ms": 3, "prefill_ms": 20, "transfer_ms": 4, "decode_ms": 50}),
        rec(0, [1.0], status="CANCELLED", timings={"queue_ms": 999.0}),
    ]
    assert phase_breakdown(records) == {
        "queue_ms": 2.0,
        "prefill_ms": 15.0,
        "transfer_ms": 3.0,
        "decode_ms": 40.0,
    }
    assert phase_breakdown(records[2:]) == dict.fromkeys(phase_breakdown(records))


def scale_records() -> list[RequestRecord]:
    """Required SLO scales (max of TTFT/0.5 s and TPOT/0.1 s) 0.5, 1, 2 and ∞."""
    return [
        rec(0.0, [0.25, 0.30]),  # TTFT ratio 0.5, TPOT ratio 0.5 → 0.5
        rec(0.0, [0.10, 0.20]),  # TTFT ratio 0.2, TPOT ratio 1.0 → 1
        rec(0.0, [1.00, 1.01]),  # TTFT ratio 2.0, TPOT ratio 0.1 → 2
        rec(0.0, [], status="INTERNAL"),
    ]


def test_attainment_vs_slo_scale() -> None:
    curve = attainment_vs_scale(scale_records(), SLO_1, [0.25, 0.5, 1, 2, 4])
    assert curve == [(0.25, 0.0), (0.5, 0.25), (1, 0.5), (2, 0.75), (4, 0.75)]
    assert min_slo_scale(scale_records(), SLO_1, 0.5) == pytest.approx(1.0)
    assert min_slo_scale(scale_records(), SLO_1, 0.75) == pytest.approx(2.0)
    assert min_slo_scale(scale_records(), SLO_1, 0.9) == math.inf
    with pytest.raises(ValueError, match="SLO scale must be > 0, got 0"):
        SLO_1.scaled(0)


def test_goodput_finds_a_step_threshold_within_tol() -> None:
    result = goodput(lambda r: 1.0 if r <= 3.7 else 0.5, lo=0.5, hi=10.0, tol=0.01)
    assert result.status == "found"
    assert 3.7 - 0.01 <= result.rate <= 3.7
    assert result.points[:2] == [(0.5, 1.0), (10.0, 0.5)]
    assert len(result.points) == 2 + math.ceil(math.log2(9.5 / 0.01))
    assert result.per_worker(4) == pytest.approx(result.rate / 4)


def test_goodput_on_a_smooth_monotone_curve() -> None:
    def curve(rate: float) -> float:  # attainment 0.9 exactly at rate 5 − ln 9
        return 1 / (1 + math.exp(rate - 5))

    result = goodput(curve, 0.1, 20.0, target=0.9, tol=1e-3)
    assert result.rate == pytest.approx(5 - math.log(9), abs=1e-3)
    assert curve(result.rate) >= 0.9
    assert all(a >= 0.9 for r, a in result.points if r <= result.rate)


def test_goodput_edges_and_bad_arguments() -> None:
    low = goodput(lambda r: 0.2, 1.0, 8.0)
    assert (low.rate, low.status, len(low.points)) == (0.0, "below_lo", 1)
    high = goodput(lambda r: 0.95, 1.0, 8.0)
    assert (high.rate, high.status) == (8.0, "at_hi")
    json.dumps(high.to_json(), allow_nan=False)
    with pytest.raises(ValueError, match="need 0 < lo < hi, got lo=2.0, hi=1.0"):
        goodput(lambda r: 1.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="target attainment must be in \\(0, 1\\], got 1.5"):
        goodput(lambda r: 1.0, 1.0, 2.0, target=1.5)
    with pytest.raises(ValueError, match="tol must be > 0 req/s, got 0"):
        goodput(lambda r: 1.0, 1.0, 2.0, tol=0)
    assert per_worker(6.0, 3) == 2.0
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        per_worker(1.0, 0)
    with pytest.raises(ValueError, match="SLO ttft_s must be > 0, got -1"):
        SLO(-1, 1)


def test_summary_is_json_and_records_round_trip() -> None:
    records = scale_records()
    s = summarize(records, SLO_1, target=0.5, scales=[0.5, 1.0])
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    assert s["slo_scale"] == [[0.5, 0.25], [1.0, 0.5]]
    assert s["min_slo_scale"] == pytest.approx(1.0)
    assert s["slo"] == {"ttft_ms": 500.0, "tpot_ms": 100.0}
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert s["send_lag_ms"]["p99"] == 0.0
    assert s["duration_s"] == pytest.approx(1.01)
    assert s["output_tok_s"] == pytest.approx(6 / 1.01)
    assert summarize(records, SLO_1, target=0.9)["min_slo_scale"] is None
    for r in records:
        assert RequestRecord.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_plots_write_pngs(tmp_path: Path) -> None:
    rates = {"disagg": [(1.0, 1.0), (2.0, 0.95), (4.0, 0.6)], "colocated": [(1.0, 0.9), (2.0, 0.4)]}
    scales = {"disagg": [(0.5, 0.3), (1.0, 0.9), (2.0, 1.0)]}
    phases: dict[str, dict[str, float | None]] = {
        "disagg": {"queue_ms": 1.0, "prefill_ms": 10.0, "transfer_ms": 2.0, "decode_ms": 40.0},
        "colocated": {"queue_ms": 5.0, "prefill_ms": 12.0, "transfer_ms": None, "decode_ms": 60.0},
    }
    outs = [
        plot_attainment_vs_rate(rates, tmp_path / "rate.png"),
        plot_attainment_vs_scale(scales, tmp_path / "scale.png"),
        plot_phase_breakdown(phases, tmp_path / "sub" / "phases.png"),
    ]
    for out in outs:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
