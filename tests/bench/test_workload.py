"""Workloads: arrival processes, trace scaling, length fitting, the Azure traces and
JSONL files (bench/workload.py, bench/traces.py). No server, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.traces import (
    AZURE_TRACES,
    SyntheticLengths,
    Trace,
    load_azure,
    load_jsonl,
    traces_dir,
)
from bench.workload import (
    fit_lengths,
    gamma_arrivals,
    interarrival_cv,
    length_scale,
    make_workload,
    mean_rate,
    poisson_arrivals,
    scale_arrivals,
)

needs_traces = pytest.mark.skipif(
    not (traces_dir() / AZURE_TRACES["azure-conv"]).is_file(), reason="no ../shared/traces"
)


def test_poisson_rate_and_cv() -> None:
    arrivals = poisson_arrivals(20_000, 5.0, seed=1)
    assert arrivals[0] == 0.0 and all(np.diff(arrivals) >= 0)
    assert mean_rate(arrivals) == pytest.approx(5.0, rel=0.03)
    assert interarrival_cv(arrivals) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_rate_and_cv(cv: float) -> None:
    arrivals = gamma_arrivals(50_000, 8.0, cv, seed=2)
    assert mean_rate(arrivals) == pytest.approx(8.0, rel=0.05)
    assert interarrival_cv(arrivals) == pytest.approx(cv, rel=0.1)


def test_gamma_cv_zero_is_evenly_spaced() -> None:
    assert gamma_arrivals(4, 2.0, 0.0) == [0.0, 0.5, 1.0, 1.5]


def test_arrivals_deterministic_by_seed() -> None:
    assert gamma_arrivals(100, 3.0, 2.0, seed=7) == gamma_arrivals(100, 3.0, 2.0, seed=7)
    assert gamma_arrivals(100, 3.0, 2.0, seed=7) != gamma_arrivals(100, 3.0, 2.0, seed=8)
    assert poisson_arrivals(50, 1.0, 3) == gamma_arrivals(50, 1.0, 1.0, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0, "rate": 1.0, "cv": 1.0}, "n must be >= 1, got 0"),
        ({"n": 5, "rate": 0.0, "cv": 1.0}, "rate must be > 0 req/s, got 0.0"),
        ({"n": 5, "rate": 1.0, "cv": -1.0}, "cv must be >= 0, got -1.0"),
    ],
)
def test_arrivals_reject_bad_values(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gamma_arrivals(**kwargs)  # type: ignore[arg-type]


def test_trace_scaling_hits_the_rate_exactly_and_keeps_the_shape() -> None:
    ts = [10.0, 10.5, 13.0, 13.1, 20.0]
    scaled = scale_arrivals(ts, 2.0)
    assert scaled[0] == 0.0
    assert mean_rate(scaled) == pytest.approx(2.0, rel=1e-12)
    gaps, scaled_gaps = np.diff(ts), np.diff(scaled)
    assert np.allclose(scaled_gaps / gaps, scaled_gaps[0] / gaps[0])
    assert scale_arrivals([3.0], 5.0) == [0.0]
    with pytest.raises(ValueError, match="must not decrease"):
        scale_arrivals([1.0, 0.5], 1.0)
    with pytest.raises(ValueError, match="positive span"):
        scale_arrivals([1.0, 1.0], 1.0)


def test_fit_lengths_never_exceeds_and_reports_scale() -> None:
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 5000, 500).tolist()
    outputs = rng.integers(1, 800, 500).tolist()
    fitted = fit_lengths(prompts, outputs, 512)
    longest = max(np.add(prompts, outputs))
    assert fitted.scale == pytest.approx(512 / longest)
    assert fitted.clipped == 0
    assert min(fitted.prompt_lens) >= 1 and min(fitted.output_lens) >= 1
    assert max(np.add(fitted.prompt_lens, fitted.output_lens)) <= 512
    # a quantile below 1 scales less and clips the long tail, still within the limit
    q = fit_lengths(prompts, outputs, 512, quantile=0.5)
    assert q.scale > fitted.scale and q.clipped > 0
    assert max(np.add(q.prompt_lens, q.output_lens)) <= 512


def test_fit_lengths_floor_and_no_upscaling() -> None:
    assert fit_lengths([10, 20], [5, 5], 100) == fit_lengths([10, 20], [5, 5], 100)
    same = fit_lengths([10, 20], [5, 5], 100)
    assert (same.prompt_lens, same.output_lens, same.scale) == ([10, 20], [5, 5], 1.0)
    tiny = fit_lengths([1, 9000], [9000, 1], 2)
    assert (tiny.prompt_lens, tiny.output_lens) == ([1, 1], [1, 1])
    with pytest.raises(ValueError, match="max_model_len must be >= 2, got 1"):
        fit_lengths([1], [1], 1)
    with pytest.raises(ValueError, match="lengths must be >= 1, got 0"):
        fit_lengths([0], [1], 10)
    with pytest.raises(ValueError, match="quantile must be in"):
        fit_lengths([1], [1], 10, quantile=0.0)


@needs_traces
@pytest.mark.parametrize(("name", "rows"), [("azure-conv", 19_366), ("azure-code", 8_819)])
def test_azure_traces_load(name: str, rows: int) -> None:
    trace = load_azure(name)
    assert len(trace) == rows and trace.name == name
    assert trace.timestamps_s is not None and trace.timestamps_s[0] == 0.0
    assert 3000 < trace.timestamps_s[-1] < 3700  # about an hour
    assert min(trace.prompt_lens) >= 1 and min(trace.output_lens) >= 1


@needs_traces
def test_azure_means_match_the_readme() -> None:
    conv, code = load_azure("azure-conv"), load_azure("azure-code")
    assert np.mean(conv.prompt_lens) == pytest.approx(1155, abs=1)
    assert np.mean(conv.output_lens) == pytest.approx(211, abs=1)
    assert np.mean(code.prompt_lens) == pytest.approx(2048, abs=1)
    assert interarrival_cv(code.timestamps_s or ()) == pytest.approx(13, abs=0.5)


def test_traces_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / AZURE_TRACES["azure-code"]).write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.5000000,100,10\n"
        "2023-11-17 00:00:01.0000000,200,20\n"
    )
    monkeypatch.setenv("PDSERVE_TRACES", str(tmp_path))
    assert traces_dir() == tmp_path
    trace = load_azure("azure-code")
    assert trace.prompt_lens == (100, 200) and trace.output_lens == (10, 20)
    assert trace.timestamps_s == pytest.approx((0.0, 1.5))  # across midnight
    with pytest.raises(ValueError, match="unknown Azure trace 'azure-chat'"):
        load_azure("azure-chat")


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_parses_lengths_and_timestamps(tmp_path: Path) -> None:
    rows = [
        {"prompt_len": 10, "output_len": 3, "timestamp": 5.0},
        {"prompt_len": 20, "output_len": 1, "timestamp": 5.5},
        {"prompt_len": 7, "output_len": 9, "timestamp": 7},
    ]
    trace = load_jsonl(write(tmp_path / "t.jsonl", [json.dumps(r) for r in rows] + [""]))
    assert trace.prompt_lens == (10, 20, 7) and trace.output_lens == (3, 1, 9)
    assert trace.timestamps_s == (0.0, 0.5, 2.0)
    plain = load_jsonl(write(tmp_path / "p.jsonl", ['{"prompt_len": 4, "output_len": 2}']))
    assert plain.timestamps_s is None


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("{not json", r"bad.jsonl:2: not JSON"),
        ("[1, 2]", r"bad.jsonl:2: expected a JSON object, got list"),
        ('{"prompt_len": 4}', r"bad.jsonl:2: missing 'output_len'"),
        (
            '{"prompt_len": 0, "output_len": 2}',
            r"bad.jsonl:2: prompt_len must be an integer >= 1, got 0",
        ),
        ('{"prompt_len": 3, "output_len": true}', r"bad.jsonl:2: output_len .* got True"),
        ('{"prompt_len": 3, "output_len": 2.5}', r"bad.jsonl:2: output_len .* got 2.5"),
        ('{"prompt_len": 3, "output_len": 2}', r"bad.jsonl:2: missing 'timestamp'"),
        (
            '{"prompt_len": 3, "output_len": 2, "timestamp": 0.5}',
            r"bad.jsonl:2: timestamp 0.5 is before",
        ),
        ('{"prompt_len": 3, "output_len": 2, "timestamp": "x"}', r"bad.jsonl:2: timestamp must be"),
    ],
)
def test_jsonl_bad_row_names_the_line(tmp_path: Path, bad: str, match: str) -> None:
    path = write(
        tmp_path / "bad.jsonl", ['{"prompt_len": 1, "output_len": 1, "timestamp": 1}', bad]
    )
    with pytest.raises(ValueError, match=match):
        load_jsonl(path)


def test_jsonl_mixed_timestamps_and_empty(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.jsonl",
        [
            '{"prompt_len": 1, "output_len": 1}',
            '{"prompt_len": 1, "output_len": 1, "timestamp": 3}',
        ],
    )
    with pytest.raises(ValueError, match=r"m.jsonl:2: has a 'timestamp' but earlier lines do not"):
        load_jsonl(path)
    with pytest.raises(ValueError, match="no requests"):
        load_jsonl(write(tmp_path / "e.jsonl", [""]))


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "fixed"])
def test_synthetic_means(dist: str) -> None:
    trace = SyntheticLengths(dist, prompt_mean=200, output_mean=40, spread=0.5).sample(20_000, 3)
    assert np.mean(trace.prompt_lens) == pytest.approx(200, rel=0.03)
    assert np.mean(trace.output_lens) == pytest.approx(40, rel=0.03)
    assert trace == SyntheticLengths(dist, 200, 40, 0.5).sample(20_000, 3)


def test_synthetic_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown synthetic dist 'normal'"):
        SyntheticLengths("normal")
    with pytest.raises(ValueError, match="prompt_mean must be >= 1, got 0"):
        SyntheticLengths(prompt_mean=0)
    with pytest.raises(ValueError, match="spread must be in"):
        SyntheticLengths("uniform", spread=1.5)


def test_make_workload_poisson_synthetic() -> None:
    synth = SyntheticLengths("uniform", 300, 100)
    wl = make_workload("synthetic", 200, 4.0, 256, seed=5, synthetic=synth)
    assert [r.index for r in wl.requests] == list(range(200))
    assert all(r.prompt_len + r.output_len <= 256 for r in wl.requests)
    assert wl.scale < 1 and wl.arrival == "poisson" and wl.cv == 1.0
    assert mean_rate([r.arrival_s for r in wl.requests]) == pytest.approx(4.0, rel=0.2)
    assert wl == make_workload("synthetic", 200, 4.0, 256, seed=5, synthetic=synth)
    meta = json.loads(json.dumps(wl.metadata(), allow_nan=False))
    assert meta["num_requests"] == 200 and meta["scale"] == wl.scale


def test_make_workload_trace_arrivals_hit_the_rate() -> None:
    trace = Trace("t", (5, 6, 7, 8, 9), (1, 2, 3, 4, 5), (0.0, 1.0, 1.5, 4.0, 9.0))
    wl = make_workload(trace, 4, 3.0, 100, arrival="trace", offset=1)
    assert [r.prompt_len for r in wl.requests] == [6, 7, 8, 9]
    assert mean_rate([r.arrival_s for r in wl.requests]) == pytest.approx(3.0, rel=1e-12)
    with pytest.raises(ValueError, match="offset 2 \\+ num_requests 4 exceeds the 5 rows"):
        make_workload(trace, 4, 3.0, 100, arrival="trace", offset=2)


def test_make_workload_rejects_bad_choices() -> None:
    with pytest.raises(ValueError, match="unknown arrival process 'uniform'"):
        make_workload("synthetic", 5, 1.0, 100, arrival="uniform")
    with pytest.raises(ValueError, match="has no timestamps for arrival='trace'"):
        make_workload("synthetic", 5, 1.0, 100, arrival="trace")
    with pytest.raises(ValueError, match="unknown dataset 'sharegpt'"):
        make_workload("sharegpt", 5, 1.0, 100)
    with pytest.raises(ValueError, match="num_requests must be >= 1, got 0"):
        make_workload("synthetic", 0, 1.0, 100)


@needs_traces
def test_make_workload_azure_trace_arrivals() -> None:
    wl = make_workload("azure-code", 500, 2.0, 512, arrival="trace")
    assert mean_rate([r.arrival_s for r in wl.requests]) == pytest.approx(2.0, rel=1e-9)
    assert wl.cv > 2  # the code trace is bursty
    assert max(r.prompt_len + r.output_len for r in wl.requests) <= 512


def test_scale_from_other_data_clips_what_does_not_fit() -> None:
    assert length_scale([100, 300], [100, 100], 200) == 0.5
    assert length_scale([100, 50, 300], [100, 100, 100], 200, quantile=0.5) == 1.0
    fitted = fit_lengths([100, 900], [100, 100], 200, scale=0.5)
    assert (fitted.prompt_lens, fitted.output_lens, fitted.clipped) == ([50, 180], [50, 20], 1)
    with pytest.raises(ValueError, match="scale must be in \\(0, 1\\], got 2"):
        fit_lengths([1], [1], 10, scale=2)


@needs_traces
def test_workload_scale_comes_from_the_whole_dataset() -> None:
    conv = load_azure("azure-conv")
    full = length_scale(conv.prompt_lens, conv.output_lens, 2048)
    assert full == pytest.approx(2048 / max(np.add(conv.prompt_lens, conv.output_lens)))
    for n, seed in ((10, 0), (300, 1)):
        wl = make_workload("azure-conv", n, 1.0, 2048, seed=seed)
        assert wl.scale == full and wl.clipped == 0
