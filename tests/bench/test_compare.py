"""`pdserve bench compare`: the systems it deploys, goodput from a rate sweep, the
tables, and (slow) one short end-to-end run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compare import (
    COLOCATED,
    COLOCATED_CHUNKED,
    goodput_table,
    latency_table,
    sweep_goodput,
    system_figures,
    systems,
)
from bench.metrics import SLO, RequestRecord
from router.config import ServeConfig


def record(i: int, ttft: float, tpot: float, n: int = 3) -> RequestRecord:
    first = 1.0 + ttft
    times = [first + k * tpot for k in range(n)]
    return RequestRecord(i, 1.0, first, times, times[-1], "ok", 10, n)


def test_systems_share_workers_and_differ_only_in_layout() -> None:
    base = ServeConfig().with_overrides(model="m", **{"decode.max_num_seqs": 7})
    got = {s.name: s for s in systems(base, 3, (1, 2), chunk_size=256)}
    assert list(got) == [COLOCATED_CHUNKED, COLOCATED, "disagg-1:2"]
    chunked, whole, disagg = got.values()
    assert chunked.config.colocated and whole.config.colocated and not disagg.config.colocated
    assert [s.workers for s in got.values()] == [3, 3, 3]
    assert chunked.config.decode.chunked_prefill
    assert chunked.config.decode.max_num_batched_tokens == 256
    assert not whole.config.decode.chunked_prefill
    assert (disagg.config.prefill.num_instances, disagg.config.decode.num_instances) == (1, 2)
    assert {s.config.decode.max_num_seqs for s in got.values()} == {7}  # the base carries over


@pytest.mark.parametrize("pd", [(0, 2), (2, 0), (2, 2)])
def test_systems_reject_a_bad_split(pd: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="P:D must have"):
        systems(ServeConfig(), 3, pd, 512)


def test_sweep_goodput_interpolates_the_crossing() -> None:
    # 100% at 1 req/s, 80% at 3: the 90% target is crossed half way, at 2 req/s.
    assert sweep_goodput([(3.0, 0.8), (1.0, 1.0)], 0.9) == (pytest.approx(2.0), "found")
    assert sweep_goodput([(1.0, 0.95), (2.0, 0.9)], 0.9) == (2.0, "at_hi")
    assert sweep_goodput([(1.0, 0.5), (2.0, 0.4)], 0.9) == (0.0, "below_lo")
    # A dip then recovery: the first miss ends the goodput (attainment must hold on).
    assert sweep_goodput([(1, 1.0), (2, 0.8), (3, 0.95)], 0.9)[0] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no"):
        sweep_goodput([], 0.9)


def test_system_figures_read_each_run_against_each_slo() -> None:
    fast = [record(i, 0.1, 0.05) for i in range(10)]
    slow_tpot = [record(i, 0.1, 0.15 if i < 5 else 0.05) for i in range(10)]
    runs = {1.0: fast, 2.0: slow_tpot}
    tight, loose = SLO(1.0, 0.1), SLO(1.0, 0.2)
    fig = system_figures(runs, [tight, loose], workers=2, target=0.9)
    t, lo = fig["slos"]
    assert t["attainment"] == [(1.0, 1.0), (2.0, 0.5)]
    assert lo["attainment"] == [(1.0, 1.0), (2.0, 1.0)]
    assert t["goodput"] == pytest.approx(1.2) and t["status"] == "found"
    assert lo["goodput"] == 2.0 and lo["status"] == "at_hi"
    assert lo["per_worker"] == 1.0
    assert fig["latency"][1.0]["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert fig["latency"][2.0]["tpot_ms"]["p99"] == pytest.approx(150.0)
    table = goodput_table({"sys": fig}, 1)
    assert "≥    2.00     1.00" in table and "100%" in table
    assert "100/100/100" in latency_table({"sys": fig})


@pytest.mark.slow
def test_bench_compare_end_to_end_on_the_tiny_model(tiny_llama: Path, tmp_path: Path) -> None:
    from router.cli import main

    cfg = {
        "dtype": "float32",
        "prefill": {"num_blocks": 64, "max_num_batched_tokens": 256},
        "decode": {"num_blocks": 64},
        "router": {"profile_repeats": 1},
    }
    path = tmp_path / "base.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    out = tmp_path / "compare.json"
    argv = ["bench", "compare", "--config", str(path), "--model", str(tiny_llama)]
    argv += ["--rates", "2,8", "--num-requests", "6", "--warmup", "1", "--pd", "1:1"]
    argv += ["--chunk-size", "32", "--slo-tpot-ms", "50,500", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    report = json.loads(out.read_text())
    figures = report["figures"]
    assert list(figures) == [COLOCATED_CHUNKED, COLOCATED, "disagg-1:1"]
    for fig in figures.values():
        assert fig["workers"] == 2
        for s in fig["slos"]:
            assert [r for r, _ in s["attainment"]] == [2.0, 8.0]
            assert all(0 <= a <= 1 for _, a in s["attainment"])
        tight, loose = (dict(s["attainment"]) for s in fig["slos"])
        assert all(tight[r] <= loose[r] for r in tight)
    for name in figures:
        runs = report["records"][name]
        assert sum(len(v) for v in runs.values()) == 12
        assert all(r["status"] == "ok" for v in runs.values() for r in v)
    assert out.with_name("compare-tpot50ms.png").is_file()
