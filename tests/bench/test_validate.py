"""The simulator validation: the simulated twin built from a server's reports, the
comparison maths on hand-made records, and (slow) one small end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import ParseDict

from bench.metrics import SLO, RequestRecord
from bench.sim import SimRequest, SimResult, calibrate
from bench.validate import (
    Twin,
    compare,
    format_table,
    sim_config,
    sim_records,
    simulate_twin,
    trace_of,
    transfer_bandwidth,
)
from protos import pdserve_pb2 as pb
from router.config import PoolConfig, RouterConfig, ServeConfig, SLOConfig
from router.latency_model import LatencyModel
from router.step_fit import Coefficients

INFO = {
    "model": "m",
    "pools": [
        {"role": "prefill", "num_instances": 2, "tp": 1, "pp": 1},
        {"role": "decode", "num_instances": 1, "tp": 1, "pp": 1},
    ],
    "max_model_len": 2048,
}


def instance(name: str, blocks: int, prefill_a: float, samples: int, **extra: Any) -> dict:
    return {
        "instance_id": name,
        "role": name.split("-")[0],
        "blocks_total": blocks,
        "block_size": 16,
        "kv_bytes_per_token": 4096,
        "prefill_model": {"a": prefill_a, "b": 1e-4, "c": 1e-9, "num_samples": samples},
        "decode_model": {"a": 0.02, "b": 2e-6, "c": 5e-4, "num_samples": samples},
        **extra,
    }


def load(transfers: int = 4, nbytes: int = 8_000_000, seconds: float = 0.02) -> pb.LoadReport:
    decode = instance(
        "decode-0",
        300,
        0.05,
        10,
        kv_transfers=transfers,
        kv_transfer_bytes=nbytes,
        kv_transfer_seconds=seconds,
    )
    report = {
        "instances": [
            instance("prefill-0", 500, 0.01, 30),
            instance("prefill-1", 400, 0.03, 10),
            decode,
        ]
    }
    return ParseDict(report, pb.LoadReport())


def config() -> ServeConfig:
    return ServeConfig(
        model="m",
        prefill=PoolConfig(num_instances=2, max_num_batched_tokens=512, policy="shortest_first"),
        decode=PoolConfig(max_num_seqs=24, chunked_prefill=False),
        router=RouterConfig(policy="round_robin", transfer_gbps=2.0),
        slo=SLOConfig(ttft_s=0.5, tpot_s=0.05),
    )


def test_sim_config_from_the_server_reports() -> None:
    cfg = sim_config(
        config(),
        ParseDict(INFO, pb.ServerInfo()),
        load(),
        bandwidth=3e8,
        step_time_ratios={"decode": [1.5, 0.5]},
    )
    assert cfg.prefill is not None and cfg.decode is not None
    assert (cfg.prefill.count, cfg.decode.count) == (2, 1)
    assert (cfg.prefill.num_blocks, cfg.decode.num_blocks) == (400, 300)  # the smallest
    assert cfg.prefill.block_size == cfg.decode.block_size == 16
    assert (cfg.prefill.max_num_batched_tokens, cfg.decode.max_num_seqs) == (512, 24)
    assert not cfg.decode.chunked_prefill and cfg.prefill_policy == "shortest_first"
    # Each pool's model: its instances' fits weighted by their sample counts.
    assert cfg.prefill.latency.prefill.coefficients.a == pytest.approx((30 * 0.01 + 10 * 0.03) / 40)
    assert cfg.decode.latency.decode.coefficients.c == pytest.approx(5e-4)
    assert cfg.decode.latency.prefill.coefficients.a == pytest.approx(0.05)
    assert (cfg.prefill.step_time_ratios, cfg.decode.step_time_ratios) == ((), (1.5, 0.5))
    assert cfg.kv_bytes_per_token == 4096 and cfg.bandwidth == 3e8
    assert (cfg.ttft_s, cfg.tpot_s, cfg.expected_output_len) == (0.5, 0.05, 128)
    assert not isinstance(cfg.policy, str) and cfg.policy.name == "round_robin"
    # Without a measured bandwidth: the router's assumed one.
    assumed = sim_config(config(), ParseDict(INFO, pb.ServerInfo()), load())
    assert assumed.bandwidth == 2e9


def test_sim_config_names_what_is_missing() -> None:
    info = ParseDict({**INFO, "pools": INFO["pools"][:1]}, pb.ServerInfo())
    with pytest.raises(ValueError, match="no decode pool"):
        sim_config(config(), info, load())
    bare = pb.LoadReport(instances=[pb.InstanceLoad(instance_id="prefill-0", role="prefill")])
    bare.instances.add(instance_id="decode-0", role="decode")
    with pytest.raises(ValueError, match="no latency model for 'prefill-0'"):
        sim_config(config(), ParseDict(INFO, pb.ServerInfo()), bare)


def test_transfer_bandwidth_over_one_run() -> None:
    before, after = load(4, 8_000_000, 0.02), load(10, 20_000_000, 0.08)
    assert transfer_bandwidth(after, before) == (pytest.approx(12_000_000 / 0.06), 6)
    assert transfer_bandwidth(after) == (pytest.approx(20_000_000 / 0.08), 10)
    assert transfer_bandwidth(after, after) is None  # nothing moved in between


def record(i: int, ttft: float, tpot: float, n: int = 5, status: str = "ok") -> RequestRecord:
    first = 1.0 + ttft
    times = [first + k * tpot for k in range(n)]
    return RequestRecord(i, 1.0, first, times, times[-1], status, 10, n)


def test_compare_gives_the_error_in_percentage_points() -> None:
    slo = SLO(0.5, 0.05)
    # Measured: 3 of 4 meet (one TTFT miss); simulated: 2 of 4 (a TPOT miss, a failure).
    measured = [
        record(0, 0.1, 0.01),
        record(1, 0.2, 0.02),
        record(2, 0.9, 0.01),
        record(3, 0.3, 0.04),
    ]
    simulated = [
        record(0, 0.1, 0.01),
        record(1, 0.2, 0.08),
        record(2, 0.4, 0.01),
        record(3, 0.3, 0.04, status="RESOURCE_EXHAUSTED"),
    ]
    row = compare(2.0, measured, [simulated], slo)
    assert (row["rate"], row["measured"], row["simulated"]) == (2.0, 0.75, 0.5)
    assert row["error_pp"] == pytest.approx(-25.0) and row["simulated_range"] == [0.5, 0.5]
    assert row["measured_ttft_p50_ms"] == pytest.approx(250.0)  # of 100, 200, 300, 900
    assert row["simulated_ttft_p50_ms"] == pytest.approx(200.0)  # the failed one left out
    assert row["simulated_tpot_p90_ms"] == pytest.approx(10 + 0.8 * 70)  # of 10, 10, 80 ms
    table = format_table([row])
    assert "75.0%" in table and "50.0%" in table and "-25.0" in table and " 50-50 " in table
    assert "250 / 200" in table
    # Replicas: the mean attainment, its range, percentiles over every request.
    row = compare(2.0, measured, [simulated, measured], slo)
    assert row["simulated"] == 0.625 and row["simulated_range"] == [0.5, 0.75]
    assert row["simulated_ttft_p50_ms"] == pytest.approx(200.0)  # of 7 ok requests
    with pytest.raises(ValueError, match="simulated runs of"):
        compare(2.0, measured, [simulated[:3]], slo)


def test_simulated_requests_become_records() -> None:
    done = SimRequest(0, 0.5, 10, 3, first_token_s=0.6, finish_s=0.8)
    done.token_times = [0.6, 0.7, 0.8]
    rejected = SimRequest(1, 0.7, 20, 4, status="rejected")
    result = SimResult([done, rejected], [], 0.8, 0.0, 2)
    ok, bad = sim_records(result)
    assert ok.ok and ok.ttft_s == pytest.approx(0.1) and ok.tpot_s == pytest.approx(0.1)
    assert not bad.ok and bad.status == "RESOURCE_EXHAUSTED"
    assert trace_of([ok, bad]) == [(0.5, 10, 3), (0.7, 20, 4)]


@pytest.mark.slow
def test_validate_end_to_end_on_the_tiny_model(tiny_llama: Path, tmp_path: Path) -> None:
    from bench.validate_cli import main

    cfg = {
        "model": str(tiny_llama),
        "dtype": "float32",
        "prefill": {"num_blocks": 64, "num_threads": 1, "max_num_batched_tokens": 256},
        "decode": {"num_blocks": 64, "num_threads": 1},
        "router": {"policy": "round_robin", "profile_repeats": 1},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    out = tmp_path / "validate.json"
    argv = ["--config", str(path), "--rates", "2,8", "--num-requests", "6", "--warmup", "1"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["rate"] for r in rows] == [2.0, 8.0]
    for row in rows:
        assert 0 <= row["measured"] <= 1 and 0 <= row["simulated"] <= 1
        assert row["error_pp"] == pytest.approx(100 * (row["simulated"] - row["measured"]))
        assert row["measured_ttft_p50_ms"] > 0 and row["simulated_ttft_p50_ms"] > 0
        assert row["measured_tpot_p50_ms"] > 0 and row["simulated_tpot_p50_ms"] > 0
    assert out.with_suffix(".png").is_file()
    assert len(report["runs"][0]["records"]) == 6


# ------------------------------------------------------------------ calibration


def timed(
    i: int, arrival: float, prompt: int, times: list[float], **timings: float
) -> RequestRecord:
    return RequestRecord(i, arrival, times[0], times, times[-1], "ok", prompt, len(times), timings)


def flat_model() -> LatencyModel:
    # prefill: 10 ms + 1 ms per token; decode: 20 ms + 1 ms per sequence
    return LatencyModel(Coefficients(0.01, 1e-3, 0.0), Coefficients(0.02, 0.0, 1e-3))


def test_prefill_steps_group_requests_by_their_shared_prefill_time() -> None:
    records = [
        timed(0, 0.0, 100, [0.2], prefill_ms=200.0),  # a step of 100 + 50 tokens
        timed(1, 0.0, 50, [0.21], prefill_ms=200.0),
        timed(2, 1.0, 40, [1.1], prefill_ms=100.0),  # alone
        timed(3, 2.0, 900, [3.0], prefill_ms=950.0),  # over the budget: several steps
        # Step 1 (5.0 to 5.3) holds E and 212 tokens of F (the budget); F ends in step 2
        # (to 5.5) beside G, which came at 5.1: only E's step is E's prompt alone.
        timed(4, 5.0, 300, [5.3], prefill_ms=300.0, queue_ms=0.0),
        timed(5, 5.0, 400, [5.5], prefill_ms=500.0, queue_ms=0.0),
        timed(6, 5.1, 100, [5.5], prefill_ms=200.5, queue_ms=199.5),
    ]
    steps = calibrate.prefill_steps(records, flat_model(), max_num_batched_tokens=512)
    assert [(s.predicted_s, s.observed_s, s.end_s) for s in steps] == [
        (pytest.approx(0.16), 0.2, 0.2),
        (pytest.approx(0.05), 0.1, 1.1),
        (pytest.approx(0.31), 0.3, 5.3),  # E; not F (two steps), nor G (F's tail too)
    ]


def test_decode_steps_are_recovered_from_token_arrivals() -> None:
    # A decodes alone from 1.0 (steps of 30 ms), B joins at 1.06 (after its KV pull);
    # then both get a token per 40 ms step, B's a few ms after A's.
    a = timed(0, 0.0, 10, [0.5, 1.0, 1.03, 1.06, 1.10, 1.14])
    b = timed(1, 0.5, 20, [0.9, 1.062, 1.102, 1.142])
    steps = calibrate.decode_steps([a, b], flat_model())
    observed = [round(s.observed_s, 3) for s in steps]
    assert observed == [0.03, 0.04, 0.04]  # 1.0→1.03; 1.03→1.06 has a newcomer; then two
    # A's k-th token attends to 10 + k tokens, B's to 20 + k: batch and context known.
    assert steps[0].predicted_s == pytest.approx(0.021)
    assert steps[-1].predicted_s == pytest.approx(0.022) and steps[-1].end_s == 1.14


def test_decode_steps_beside_a_prefill_are_set_apart() -> None:
    """A decode step is contended when a prefill step (start: sent + queue; length: the
    server's prefill_ms) covers more than half of it."""
    records = [timed(0, 1.0, 50, [1.2], prefill_ms=200.0, queue_ms=0.0)]  # busy 1.0-1.2
    steps = [
        calibrate.ObservedStep(0.02, 0.04, 0.98),  # 0.94-0.98: before it
        calibrate.ObservedStep(0.02, 0.04, 1.10),  # inside
        calibrate.ObservedStep(0.02, 0.04, 1.21),  # 1.17-1.21: 0.03 of 0.04 inside
        calibrate.ObservedStep(0.02, 0.04, 1.23),  # 1.19-1.23: 0.01 of 0.04 inside
    ]
    free, contended = calibrate.split_contended(steps, records)
    assert [s.end_s for s in free] == [0.98, 1.23]
    assert [s.end_s for s in contended] == [1.10, 1.21]
    assert calibrate.split_contended(steps, []) == (steps, [])


def test_step_ratios_keep_the_spread_and_the_total_time() -> None:
    steps = [calibrate.ObservedStep(0.1, 0.2, 0.0), calibrate.ObservedStep(0.3, 0.3, 1.0)]
    ratios = calibrate.step_ratios(steps)
    assert ratios[0] / ratios[1] == pytest.approx(2.0)  # the spread
    assert sum(ratios) / 2 == pytest.approx(0.5 / 0.4)  # Σ observed ÷ Σ predicted
    assert calibrate.step_ratios([]) == ()


def test_client_lag_is_the_median_over_the_server_ttft() -> None:
    records = [
        timed(i, 0.0, 10, [0.1 + lag], ttft_ms=100.0) for i, lag in enumerate([0.01, 0.02, 0.5])
    ]
    assert calibrate.client_lag(records) == pytest.approx(0.02)
    assert calibrate.client_lag([timed(0, 0.0, 10, [0.1])]) == 0.0  # no server timings


def test_replicas_draw_step_times_with_their_own_seeds() -> None:
    info = ParseDict(INFO, pb.ServerInfo())
    trace = [record(i, 0.2, 0.02, n=8) for i in range(20)]
    for i, r in enumerate(trace):  # arrivals 50 ms apart: they queue
        r.arrival_s = 0.05 * i
    steady = Twin(sim_config(config(), info, load()), {}, 0.01, None)
    assert len(simulate_twin(steady, trace, replicas=5)) == 1  # nothing drawn: one run
    ratios = {"prefill": (0.2, 3.0), "decode": (0.5, 2.0)}
    noisy = Twin(sim_config(config(), info, load(), step_time_ratios=ratios), ratios, 0.0, None)
    runs = simulate_twin(noisy, trace, replicas=3)
    assert len(runs) == 3 and len({tuple(r.ttft_s for r in run) for run in runs}) == 3
    assert runs == simulate_twin(noisy, trace, replicas=3)  # seeded
    (lagged,) = simulate_twin(steady, trace)
    (plain,) = simulate_twin(Twin(steady.config, {}, 0.0, None), trace)
    assert lagged[0].ttft_s == pytest.approx(plain[0].ttft_s + 0.01)  # the client's lag
    assert lagged[0].tpot_s == pytest.approx(plain[0].tpot_s)
    with pytest.raises(ValueError, match="replicas"):
        simulate_twin(steady, trace, replicas=0)
