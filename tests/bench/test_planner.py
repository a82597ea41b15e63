"""The placement planner (bench/planner/): roofline, memory filter, DistServe's two
placement algorithms, the search, the CPU profile and ``pdserve plan``. No Ray."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import pytest

from bench.planner import PlanOptions, build_spec, plan_placements, run_plan
from bench.planner.cpu_profile import cache_dir, load_latency_model, measured_latency_model
from bench.planner.devices import DEVICES, cpu_device, get_device
from bench.planner.evaluate import SEARCH_TOL
from bench.planner.placements import HIGH, LOW, high_affinity, low_affinity
from bench.planner.roofline import Layout, Roofline, latency_model
from bench.planner.sizing import SizedLayout, saturating_budget, size_layout
from bench.traces import AZURE_TRACES, traces_dir
from engine.layout import valid_tp_values, weight_bytes_per_rank
from engine.model_config import ModelConfig
from router.cli import main
from router.latency_model import LatencyModel
from router.step_fit import Coefficients

ROOT = Path(__file__).resolve().parents[2]
LLAMA_70B = ROOT / "examples" / "llama3-70b"
H100 = DEVICES["h100"]
BF16 = "bfloat16"
needs_traces = pytest.mark.skipif(
    not (traces_dir() / AZURE_TRACES["azure-conv"]).is_file(), reason="no ../shared/traces"
)


@pytest.fixture(scope="module")
def llama70b() -> ModelConfig:
    return ModelConfig.from_pretrained(LLAMA_70B)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config.json only: a ~0.4B llama (8 layers, hidden 1024) that fits one A100."""
    cfg = json.loads((LLAMA_70B / "config.json").read_text())
    cfg.update(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    path = tmp_path_factory.mktemp("planner") / "small"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# ---------------------------------------------------------------- roofline


def test_decode_batch1_is_reading_the_weights(llama70b: ModelConfig) -> None:
    roof = Roofline(llama70b, Layout(4, 1), H100, BF16)
    calib = H100.calibration
    weights = weight_bytes_per_rank(llama70b, BF16, 4, 1)
    read_s = weights / (H100.memory_bandwidth * calib.bandwidth_efficiency)
    fixed = calib.step_overhead_s + 2 * llama70b.num_layers * calib.allreduce_latency_s
    step = roof.decode_seconds(1, 16)
    # The embedding table is gathered, not read (~1.5% of the bytes); the rest is fixed costs.
    assert 0.97 * read_s + fixed < step < read_s + fixed + 1e-3
    assert 0.010 < read_s < 0.013  # 34.8 GB at 0.9 x 3.35 TB/s


def test_prefill_scales_with_tokens_and_tp_cuts_step_time(llama70b: ModelConfig) -> None:
    roofs = {tp: Roofline(llama70b, Layout(tp, 1), H100, BF16) for tp in (2, 4, 8)}
    t1k, t2k = roofs[4].prefill_seconds([1024]), roofs[4].prefill_seconds([2048])
    assert 1.8 < t2k / t1k < 2.2  # compute-bound: linear, plus a little attention
    assert roofs[4].prefill_seconds([1024, 1024]) < t2k  # two prompts: less attention
    for phase in ("prefill", "decode"):
        times = [
            r.prefill_seconds([2048]) if phase == "prefill" else r.decode_seconds(64, 64 * 1024)
            for r in (roofs[2], roofs[4], roofs[8])
        ]
        assert times[0] > times[1] > times[2], phase
    # Compute efficiency is what bounds prefill: a better calibration is faster.
    faster = Roofline(llama70b, Layout(4, 1), H100.calibrated(compute_efficiency=1.0), BF16)
    assert faster.prefill_seconds([2048]) < 0.9 * t2k


def test_host_dispatch_bounds_short_steps_only(llama70b: ModelConfig) -> None:
    plain = Roofline(llama70b, Layout(4, 1), H100, BF16)
    eager = Roofline(llama70b, Layout(4, 1), H100.calibrated(layer_dispatch_s=1e-3), BF16)
    floor = plain.overhead_s + llama70b.num_layers * 1e-3  # 80 layers launched from the host
    assert plain.decode_seconds(1, 512) < floor
    assert eager.decode_seconds(1, 512) == pytest.approx(floor)
    # A long prefill keeps the device busier than the host: launches hide under it.
    assert eager.prefill_seconds([8192]) == pytest.approx(plain.prefill_seconds([8192]))
    assert eager.prefill_seconds([8192]) > floor


def test_fitted_latency_model_tracks_the_roofline(llama70b: ModelConfig) -> None:
    roof = Roofline(llama70b, Layout(4, 1), H100, BF16)
    model = latency_model(
        roof,
        max_num_batched_tokens=1024,
        max_num_seqs=256,
        max_model_len=8192,
        kv_capacity_tokens=300_000,
    )
    for lengths in ([128], [512], [1024], [256, 256, 256]):
        assert model.predict_prefill(lengths) == pytest.approx(
            roof.prefill_seconds(lengths), rel=0.2
        )
    for bs, ctx in ((1, 1000), (32, 32 * 1200), (256, 256 * 1200)):
        assert model.predict_decode(bs, ctx) == pytest.approx(
            roof.decode_seconds(bs, ctx), rel=0.05
        )


def test_moe_flops_count_active_experts_only(tmp_path: Path) -> None:
    from engine.make_model import preset_config

    # The shape alone (config.json), as make-model writes it: no weights needed.
    (tmp_path / "config.json").write_text(json.dumps(preset_config("qwen3_moe", "tiny")))
    cfg = ModelConfig.from_pretrained(tmp_path)
    roof = Roofline(cfg, Layout(1, 1), H100, BF16)
    stored_params = weight_bytes_per_rank(cfg, BF16, 1, 1) / 2
    assert roof.expert_bytes > 0
    assert roof.decoder_params < stored_params
    # One token touches k of E experts; a long prompt touches them all.
    assert (
        roof.weights_read(1)
        < roof.weights_read(4096)
        == pytest.approx(roof.dense_bytes + roof.expert_bytes)
    )


def test_roofline_rejects_tp_across_nodes_and_cpu(llama70b: ModelConfig) -> None:
    with pytest.raises(ValueError, match="tp=16 spans nodes of 8 GPUs"):
        Roofline(llama70b, Layout(16, 1), H100, BF16)
    with pytest.raises(ValueError, match="has no roofline"):
        Roofline(llama70b, Layout(1, 1), cpu_device(2), BF16)


def test_devices_and_calibration() -> None:
    assert H100.flops == 989e12 and H100.memory_bandwidth == 3.35e12
    assert DEVICES["h200"].memory_bytes > H100.memory_bytes
    assert H100.calibration.compute_efficiency == pytest.approx(788 / 989, abs=0.01)
    assert H100.calibration.bandwidth_efficiency == pytest.approx(4.3 / 4.8, abs=0.01)
    with pytest.raises(ValueError, match="unknown calibration fields"):
        H100.calibrated(mfu=0.5)
    with pytest.raises(ValueError, match="compute_efficiency must be in"):
        H100.calibrated(compute_efficiency=1.5)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_device("tpu", 8)
    assert get_device("cpu", 3).gpus_per_node == 3


# ---------------------------------------------------------------- memory filter


@needs_traces
def test_memory_filter_70b_on_h100() -> None:
    spec = build_spec(LLAMA_70B, 8, 250, 100, PlanOptions(num_requests=20))
    reason = size_layout(spec, Layout(1, 1))
    assert isinstance(reason, str) and "weights take 131.42 GiB per rank" in reason
    assert isinstance(size_layout(spec, Layout(2, 1)), str)
    sized = size_layout(spec, Layout(4, 1))
    assert isinstance(sized, SizedLayout)
    longest_blocks = -(-spec.longest // spec.block_size)
    assert sized.kv_blocks > 10 * longest_blocks  # room for many long requests
    assert sized.pool(3).count == 3 and sized.pool(3).num_blocks == sized.kv_blocks
    piped = size_layout(spec, Layout(4, 2))
    assert isinstance(piped, SizedLayout)
    assert piped.pool(1).count == 2  # one simulated instance per micro-batch
    assert piped.pool(1).num_blocks == piped.kv_blocks // 2


def test_saturating_budget() -> None:
    # 20 ms fixed + 50 us per token: per token 5.49 us at 4096, 5.24 us at 8192.
    def step(lengths: Sequence[int]) -> float:
        return 0.02 + 5e-5 * sum(lengths)

    assert saturating_budget(step, ttft_s=10.0) == 4096  # within 5% of the best
    assert saturating_budget(step, ttft_s=0.2) == 1024  # a step must stay under 0.1 s


# ---------------------------------------------------------------- placements


def _flat_rate(phase: str, layout: Layout, across: bool, count: int) -> float:
    return count * (1.0 if phase == "prefill" else 2.0) * layout.workers


def test_low_affinity_segments_fit_a_node_and_share_pp() -> None:
    cands = low_affinity(32, H100, [1, 2, 4, 8], 4, _flat_rate)
    assert cands and {c.prefill.pp for c in cands} == {1, 2, 3, 4}
    for c in cands:
        assert c.affinity == LOW and c.prefill.pp == c.decode.pp
        assert c.replicas == 4 // c.prefill.pp
        ps, ds = c.unit
        assert ps * c.prefill.tp + ds * c.decode.tp <= H100.gpus_per_node  # one segment
        assert c.workers <= 32 and c.prefill_across == c.decode_across == (c.prefill.pp > 1)


def test_high_affinity_balances_counts_within_the_workers() -> None:
    layouts = [Layout(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]
    cands = high_affinity(16, H100, layouts, _flat_rate)
    assert cands and all(c.affinity == HIGH and c.workers <= 16 for c in cands)
    best = max(cands, key=lambda c: c.estimate)
    # Decode is twice as fast per worker: two prefill workers per decode worker.
    assert best.num_prefill * best.prefill.workers == 2 * best.num_decode * best.decode.workers


# ---------------------------------------------------------------- search


def test_search_on_a_small_model_returns_sorted_valid_placements(small_dir: Path) -> None:
    options = PlanOptions(device="a100", dataset="synthetic", num_requests=80)
    result = run_plan(small_dir, 4, 500, 50, options)
    places = result.placements
    assert places and result.simulations > 0
    goodputs = [p.goodput for p in places]
    # Best first; goodputs within the search's resolution tie and go by per-worker goodput.
    assert goodputs[0] > 0 and goodputs[0] >= (1 - SEARCH_TOL) * max(goodputs)
    assert all(a.goodput >= b.goodput or a.per_worker >= b.per_worker for a, b in pairwise(places))
    tps = valid_tp_values(ModelConfig.from_pretrained(small_dir))
    for p in places:
        c = p.candidate
        assert c.workers <= 4 and c.num_prefill >= 1 and c.num_decode >= 1
        assert c.prefill.tp in tps and c.decode.tp in tps
        assert p.per_worker == pytest.approx(p.goodput / c.workers)
        assert p.tpot_p95_s is not None and p.ttft_p95_s is not None
        assert p.bound_by in ("prefill", "decode")


def test_measured_model_places_single_workers(tmp_path: Path, small_dir: Path) -> None:
    model = LatencyModel(Coefficients(0.01, 2e-4, 1e-9), Coefficients(0.01, 2e-6, 5e-4))
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(model.to_dict()))
    assert load_latency_model(path).decode.coefficients == model.decode.coefficients
    options = PlanOptions(device="cpu", dataset="synthetic", num_requests=60, latency_model=path)
    places = plan_placements(small_dir, 4, 2000, 200, options)
    assert places
    for p in places:
        c = p.candidate
        assert c.prefill == c.decode == Layout(1, 1)
        assert c.num_prefill + c.num_decode <= 4


def test_cpu_profile_is_measured_once_and_cached(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    first = measured_latency_model(tiny_llama)
    cached = list(cache_dir().glob("*.json"))
    assert len(cached) == 1 and cache_dir().is_relative_to(tmp_path)
    again = measured_latency_model(tiny_llama)
    assert again.prefill.coefficients == first.prefill.coefficients
    assert again.decode.coefficients == first.decode.coefficients
    assert first.predict_prefill([256]) > first.predict_prefill([16]) > 0


# ---------------------------------------------------------------- CLI


@needs_traces
def test_cli_plans_70b_on_8_h100_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", str(LLAMA_70B), "--workers", "8", "--slo-ttft", "250"]
    assert main([*argv, "--slo-tpot", "100", "--num-requests", "80", "--json", "--top", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    places = got["placements"]
    # The top 3, and the best of an algorithm not among them.
    assert got["device"] == "h100" and got["workers"] == 8 and 1 <= len(places) <= 4
    best = max(p["goodput_rps"] for p in places)
    assert places[0]["goodput_rps"] >= (1 - SEARCH_TOL) * best > 0
    for p in places:
        assert p["workers"] <= 8 and p["prefill"]["tp"] * p["prefill"]["pp"] >= 4  # 70B
    assert "tp1xpp1" in got["rejected_layouts"]


def test_cli_table_and_errors(small_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", str(small_dir), "--workers", "2", "--device", "a100"]
    argv += ["--slo-ttft", "500", "--slo-tpot", "50", "--dataset", "synthetic"]
    assert main([*argv, "--num-requests", "40", "--affinity", "high", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "algorithm" in out and "goodput" in out and "why:" in out
    assert "\n1  Alg.1" in out and "\n2  " not in out
    with pytest.raises(SystemExit):
        main(["plan", "--model", str(small_dir), "--workers", "2"])
    assert "required: --slo-ttft, --slo-tpot" in capsys.readouterr().err
    assert main([*argv, "--top", "0"]) == 2
    assert "--top must be >= 1" in capsys.readouterr().err
    impossible = [a if a != "500" else "1" for a in argv]  # a 1 ms TTFT
    assert main([*impossible, "--num-requests", "20"]) == 2
    captured = capsys.readouterr()
    assert "no placement meets the SLOs" in captured.out + captured.err


def test_plan_memory_mode_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "memory", "--model", str(LLAMA_70B), "--device-memory", "80GB", "--tp", "4"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
