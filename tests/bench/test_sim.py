"""The simulator (bench/sim) against closed-form results and the real schedulers (in
lockstep): M/D/1 waiting, isolated TTFT/TPOT, batching, KV admission, transfers,
chunking, leases, routing, determinism and speed. A few seconds in all."""

from __future__ import annotations

import itertools
import random
import statistics
import time
from typing import Any

import pytest

from bench.sim import (
    PoolSpec,
    SimConfig,
    SimRequest,
    Simulation,
    poisson_trace,
    simulate,
    speed,
)
from bench.sim.batcher import Batcher, SimSeq
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence
from prefill.scheduler import PrefillScheduler
from router.latency_model import LatencyModel
from router.step_fit import Coefficients

PREFILL = (0.01, 1e-4, 1e-8)  # a, b (per token), c (per token²)
DECODE = (0.02, 1e-6, 1e-3)  # a, b (per context token), c (per sequence)


def model(prefill: tuple[float, ...] = PREFILL, decode: tuple[float, ...] = DECODE) -> LatencyModel:
    return LatencyModel(Coefficients(*prefill), Coefficients(*decode))


class SpyModel(LatencyModel):
    """Records every step's prefill chunks and decode entries."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.prefills: list[list[int]] = []
        self.decodes: list[int] = []

    def predict_prefill(self, token_lengths: Any) -> float:
        self.prefills.append(list(token_lengths))
        return super().predict_prefill(token_lengths)

    def predict_decode(self, batch_size: int, context_tokens: int) -> float:
        self.decodes.append(batch_size)
        return super().predict_decode(batch_size, context_tokens)


def pd(prefill: PoolSpec | None = None, decode: PoolSpec | None = None, **kw: Any) -> SimConfig:
    """One prefill and one decode instance with roomy caches unless given."""
    return SimConfig(
        prefill=prefill or PoolSpec(1, model(), 4096),
        decode=decode or PoolSpec(1, model(), 4096),
        **kw,
    )


def pf(lengths: list[int], m: tuple[float, ...] = PREFILL) -> float:
    return m[0] + m[1] * sum(lengths) + m[2] * sum(n * n for n in lengths)


def dec(batch: int, context: int, m: tuple[float, ...] = DECODE) -> float:
    return m[0] + m[1] * context + m[2] * batch


# ------------------------------------------------------------------ closed forms


def test_md1_mean_wait_of_one_prefill_instance() -> None:
    s, rho, n = 0.01, 0.5, 20000
    fixed = model(prefill=(s, 0.0, 0.0))
    spec = PoolSpec(1, fixed, 1024, max_num_batched_tokens=64, chunked_prefill=False)
    trace = poisson_trace(rho / s, [(64, 1)] * n, seed=0)
    result = simulate(trace, pd(prefill=spec))
    waits = [r.ttft_s - s for r in result.requests]  # type: ignore[operator]
    # Exactly Lindley's recursion for a FCFS single server with service s ...
    w, lindley = 0.0, [0.0]
    for prev, cur in itertools.pairwise(trace):
        w = max(0.0, w + s - (cur[0] - prev[0]))
        lindley.append(w)
    assert waits == pytest.approx(lindley, abs=1e-9)
    # ... whose mean is M/D/1's rho·S / (2(1 − rho)).
    expected = rho * s / (2 * (1 - rho))
    assert statistics.mean(waits) == pytest.approx(expected, rel=0.05)
    assert all(r.finish_s == r.first_token_s for r in result.requests)  # one token: no decode


def test_isolated_ttft_is_the_prefill_time_and_chunks_add_up() -> None:
    result = simulate([(1.0, 500, 1), (10.0, 5000, 1)], pd())
    short, long = result.requests
    assert short.ttft_s == pytest.approx(pf([500]))
    assert short.prefill_start_s == 1.0
    chunks = [2048, 2048, 904]  # the default budget of 2048 tokens, chunked
    assert long.ttft_s == pytest.approx(sum(pf([c]) for c in chunks))
    row = result.to_dicts()[0]
    assert row["ttft_s"] == short.ttft_s and row["status"] == "ok" and row["arrival_s"] == 1.0
    assert result.summary()["finished"] == 2 and result.sim_end_s == long.finish_s


def test_isolated_tpot_is_the_decode_step_at_batch_one() -> None:
    prompt, out = 100, 20
    (r,) = simulate([(0.0, prompt, out)], pd(kv_bytes_per_token=0.0)).requests
    assert len(r.token_times) == out and r.finish_s == r.token_times[-1]
    gaps = [b - a for a, b in itertools.pairwise(r.token_times)]
    # Step k decodes at position prompt + k - 1: context prompt + k.
    assert gaps == pytest.approx([dec(1, prompt + k) for k in range(1, out)])
    assert r.tpot_s == pytest.approx(statistics.mean(gaps))


def test_transfer_adds_bytes_over_bandwidth() -> None:
    kw: dict[str, Any] = {
        "kv_bytes_per_token": 1000.0,
        "bandwidth": 1e6,
        "transfer_overhead_s": 0.003,
    }
    (r,) = simulate([(0.0, 100, 2)], pd(**kw)).requests
    # 100 tokens fill 7 blocks of 16: 112 tokens' KV moves.
    transfer = 0.003 + 112 * 1000 / 1e6
    assert r.transfer_start_s == r.first_token_s
    assert r.transfer_end_s == pytest.approx(r.first_token_s + transfer)  # type: ignore[operator]
    assert r.token_times[1] - r.token_times[0] == pytest.approx(transfer + dec(1, 101))


def test_decode_batch_grows_with_concurrent_requests() -> None:
    spy = SpyModel(Coefficients(*PREFILL), Coefficients(*DECODE))
    n, prompt, out = 8, 64, 10
    result = simulate([(0.0, prompt, out)] * n, pd(decode=PoolSpec(1, spy, 4096)))
    assert max(spy.decodes) == n  # all eight decode in the same steps
    for r in result.requests:  # every request prefilled in one step
        assert r.first_token_s == pytest.approx(pf([prompt] * n))
        assert r.token_times[-1] - r.token_times[-2] == pytest.approx(
            dec(n, n * (prompt + out - 1))
        )


# ------------------------------------------------------------------ the real schedulers


def _step_real(real: Scheduler, leased: list[Sequence], is_prefill: bool) -> list[tuple[int, int]]:
    batch = real.schedule()
    real.on_step_done(batch)
    for seq, flag in zip(batch.seqs, batch.sample_flags, strict=True):
        if not flag:
            continue
        seq.append_token(0)
        if is_prefill and seq.params.max_tokens > 1:
            assert isinstance(real, PrefillScheduler)
            real.detach(seq)
            leased.append(seq)
        elif seq.num_output_tokens >= seq.params.max_tokens:
            real.finish(seq, FinishReason.LENGTH)
    entries = [(int(s.request_id), n) for s, n in zip(batch.seqs, batch.num_tokens, strict=True)]
    return entries + [(-int(s.request_id), 0) for s in batch.preempted]


def _step_mine(mine: Batcher, leased: list[SimSeq], is_prefill: bool) -> list[tuple[int, int]]:
    step = mine.schedule()
    done = [(s.rid, n) for s, n in step.in_batch_order()]
    for seq in mine.complete(step):  # what the simulated instances then do
        if is_prefill and seq.output_len > 1:
            mine.remove_running(seq)
            leased.append(seq)
        elif seq.num_out >= seq.output_len:
            mine.remove_running(seq)
            mine.free(seq)
    return done + [(-s.rid, 0) for s in step.preempted]


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("is_prefill", [False, True])
def test_batcher_decides_as_the_real_schedulers(chunked: bool, is_prefill: bool) -> None:
    """Lockstep against engine.scheduler.Scheduler / prefill.scheduler.PrefillScheduler
    (shortest first) with the real BlockManager: the same entries in the same order,
    the same preemptions and free blocks at every step, under arrivals, finishes and
    (prefill) lease releases."""
    rng = random.Random(11)
    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=96, chunked_prefill=chunked)
    bm = BlockManager(24, 16, enable_prefix_caching=False)
    real = PrefillScheduler(cfg, bm, "shortest_first") if is_prefill else Scheduler(cfg, bm)
    mine = Batcher(24, 16, 6, 96, chunked, shortest_first=is_prefill)
    real_leased: list[Sequence] = []
    my_leased: list[SimSeq] = []
    rid = 0
    for _ in range(600):
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            prompt, out = rng.randint(1, 150), rng.randint(1, 60)
            params = SamplingParams(max_tokens=out)
            real.add(Sequence(str(rid), list(range(1, prompt + 1)), params))
            mine.add(SimSeq(SimRequest(rid, 0.0, prompt, out)))
            rid += 1
        assert _step_real(real, real_leased, is_prefill) == _step_mine(mine, my_leased, is_prefill)
        while real_leased and rng.random() < 0.5:  # a decode instance pulled it
            bm.free(real_leased.pop(0))
            mine.free(my_leased.pop(0))
        assert bm.num_free_blocks == mine.free_blocks
    assert rid > 200 and real.num_preemptions == mine.num_preemptions
    assert is_prefill or mine.num_preemptions > 0


# ------------------------------------------------------------------ KV admission


def test_admission_waits_for_blocks_and_resumes_when_freed() -> None:
    # 8 blocks of 16 tokens; a 32-token prompt needs blocks_for(33) = 3 free, plus one
    # spare per running sequence: two fit, the third waits for the first to finish.
    decode = PoolSpec(1, model(), 8)
    trace = [(0.0, 32, 5), (0.0, 32, 20), (0.0, 32, 5)]
    a, b, c = simulate(trace, pd(decode=decode)).requests
    assert a.transfer_start_s == b.transfer_start_s == a.first_token_s
    assert c.first_token_s == a.first_token_s  # prefilled together ...
    assert c.transfer_start_s == a.finish_s  # ... admitted when a's blocks came back
    assert all(r.num_preemptions == 0 for r in (a, b, c))


def test_expired_lease_makes_the_decode_instance_recompute() -> None:
    decode = PoolSpec(1, model(), 4096, max_num_seqs=1)  # one at a time
    result = simulate([(0.0, 64, 30), (0.0, 64, 30)], pd(decode=decode, lease_s=0.05))
    first, second = result.requests
    assert not first.recomputed and second.recomputed
    assert len(second.token_times) == 30 and second.finish_s is not None
    assert result.instances[0].leases_expired == 1


def test_prefill_waits_for_leased_blocks() -> None:
    prefill = PoolSpec(1, model(), 8)  # two 64-token prompts at a time
    decode = PoolSpec(1, model(), 4096, max_num_seqs=2)
    result = simulate([(0.0, 64, 50)] * 6, pd(prefill=prefill, decode=decode))
    assert result.instances[0].kv_stalls > 0
    assert all(r.finish_s is not None for r in result.requests)


# ------------------------------------------------------------------ scheduling


def test_colocated_chunked_prefill_bounds_each_step_by_the_budget() -> None:
    spy = SpyModel(Coefficients(*PREFILL), Coefficients(*DECODE))
    spec = PoolSpec(1, spy, 4096, max_num_batched_tokens=256)
    trace = [(0.0, 100, 50), (0.1, 1000, 5), (0.2, 700, 5)]
    result = simulate(trace, SimConfig(colocated=spec))
    assert all(r.finish_s is not None for r in result.requests)
    totals = [sum(p) + d for p, d in zip(spy.prefills, spy.decodes, strict=True)]
    assert max(totals) == 256 and max(max(p, default=0) for p in spy.prefills) <= 256
    spy.prefills.clear()
    simulate(trace, SimConfig(colocated=PoolSpec(1, spy, 4096, 256, chunked_prefill=False)))
    assert [1000] in spy.prefills  # without chunking a long prompt runs whole, alone


def test_mixed_step_costs_prefill_plus_decode() -> None:
    trace = [(0.0, 100, 60), (0.3, 200, 2)]
    a, b = simulate(trace, SimConfig(colocated=PoolSpec(1, model(), 4096))).requests
    k = a.token_times.index(b.first_token_s)  # type: ignore[arg-type]
    context = 100 + k  # a's k-th decode attends to prompt + k tokens
    gap = a.token_times[k] - a.token_times[k - 1]
    assert gap == pytest.approx(pf([200]) + dec(1, context))


def test_step_time_ratios_scale_each_step_deterministically() -> None:
    doubled = PoolSpec(1, model(), 4096, step_time_ratios=(2.0,), step_overhead_s=0.01)
    (r,) = simulate([(0.0, 500, 1)], pd(prefill=doubled)).requests
    assert r.ttft_s == pytest.approx(2 * pf([500]) + 0.01)  # the ratio, then the overhead
    spread = pd(prefill=PoolSpec(1, model(), 4096, step_time_ratios=(0.5, 1.5)))
    trace = [(10.0 * i, 300, 1) for i in range(40)]  # isolated: TTFT is one step
    one, two = (simulate(trace, spread).requests for _ in range(2))
    ratios = [r.ttft_s / pf([300]) for r in one]  # type: ignore[operator]
    assert set(map(round, [2 * x for x in ratios])) == {1, 3}  # both drawn
    assert [r.ttft_s for r in one] == [r.ttft_s for r in two]


def test_contended_ratios_apply_while_the_other_pool_steps() -> None:
    """A decode step that starts while the prefill instance is mid-step draws from the
    contended ratios, the others from the free ones."""
    # B's prompt arrives while A decodes: A's steps during B's long prefill are slow.
    decode = PoolSpec(1, model(), 4096, step_time_ratios=(1.0,), contended_step_time_ratios=(3.0,))
    trace = [(0.0, 10, 40), (0.2, 2000, 1)]
    a, b = simulate(trace, pd(decode=decode)).requests
    assert b.first_token_s is not None
    prefill_start = b.first_token_s - pf([2000])
    gaps = [(t1, t1 - t0) for t0, t1 in itertools.pairwise(a.token_times)]
    context = 10  # A's k-th decode attends to the prompt + k tokens
    for k, (end, gap) in enumerate(gaps, start=1):
        start = end - gap
        slow = prefill_start <= start < b.first_token_s
        ratio = 3.0 if slow else 1.0
        assert gap == pytest.approx(ratio * dec(1, context + k)), (k, start)
    assert any(prefill_start <= end - g < b.first_token_s for end, g in gaps)  # some slow
    assert any(not prefill_start <= end - g < b.first_token_s for end, g in gaps)


def test_shortest_first_prefill_overtakes() -> None:
    trace = [(0.0, 2000, 1), (0.001, 1500, 1), (0.002, 100, 1)]
    # Without chunking: the first runs alone (over the budget), then one of the others.
    spec = PoolSpec(1, model(), 4096, max_num_batched_tokens=1500, chunked_prefill=False)
    fcfs = simulate(trace, pd(prefill=spec)).requests
    sf = simulate(trace, pd(prefill=spec, prefill_policy="shortest_first")).requests
    assert fcfs[2].first_token_s > fcfs[1].first_token_s  # type: ignore[operator]
    assert sf[2].first_token_s < sf[1].first_token_s  # type: ignore[operator]


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "slo_aware"])
def test_policies_spread_requests(policy: str) -> None:
    p, d = PoolSpec(3, model(), 4096), PoolSpec(2, model(), 4096)
    trace = poisson_trace(20, [(200, 20)] * 60, seed=1)
    reqs = simulate(trace, pd(prefill=p, decode=d, policy=policy)).requests
    assert {r.prefill_id for r in reqs} == {"prefill-0", "prefill-1", "prefill-2"}
    assert {r.decode_id for r in reqs} == {"decode-0", "decode-1"}
    colocated = SimConfig(colocated=PoolSpec(4, model(), 4096), policy=policy)
    reqs = simulate(trace, colocated).requests
    assert all(r.prefill_id is None and r.finish_s is not None for r in reqs)
    assert {r.decode_id for r in reqs} == {f"colocated-{i}" for i in range(4)}


def test_slo_aware_local_prefill_and_rejection() -> None:
    options = {"local_prefill_max_tokens": 64}
    trace = [(0.0, 32, 5), (1.0, 1000, 5)]
    short, long = simulate(trace, pd(policy="slo_aware", policy_options=options)).requests
    assert short.prefill_id is None and short.decode_id == "decode-0"
    assert long.prefill_id == "prefill-0"
    strict = pd(policy="slo_aware", policy_options={"on_slo_miss": "reject"}, ttft_s=1e-4)
    (r,) = simulate([(0.0, 100, 5)], strict).requests
    assert r.status == "rejected" and r.first_token_s is None


# ------------------------------------------------------------------ runs


def test_deterministic_with_a_seed() -> None:
    lengths = [(100 + 37 * i % 900, 5 + 13 * i % 60) for i in range(300)]
    cfg = pd(PoolSpec(2, model(), 4096), PoolSpec(2, model(), 512), policy="slo_aware")
    one = simulate(poisson_trace(15, lengths, seed=3), cfg).to_dicts()
    two = simulate(poisson_trace(15, lengths, seed=3), cfg).to_dicts()
    other = simulate(poisson_trace(15, lengths, seed=4), cfg).to_dicts()
    assert one == two and one != other
    assert set(one[0]) >= {"arrival_s", "first_token_s", "token_times", "finish_s", "tpot_s"}


def test_a_thousand_instances_run_fast() -> None:
    p, d = PoolSpec(500, model(), 4096), PoolSpec(500, model(), 4096)
    trace = poisson_trace(500, [(300 + i % 700, 20 + i % 50) for i in range(2000)], seed=5)
    t0 = time.process_time()  # CPU seconds: other jobs on the machine do not count
    result = simulate(trace, pd(prefill=p, decode=d, policy="round_robin"))
    assert time.process_time() - t0 < 6.0  # ~1 s on an idle core
    assert result.summary()["finished"] == 2000
    assert len({r.decode_id for r in result.requests}) > 400


def test_every_block_comes_back() -> None:
    """DESIGN.md invariant 3 in the simulation: after a loaded run with preemptions,
    expired leases and local prefills, every instance's blocks are free again."""
    lengths = [(50 + 97 * i % 700, 1 + 31 * i % 90) for i in range(400)]
    p, d = PoolSpec(2, model(), 96, max_num_batched_tokens=512), PoolSpec(2, model(), 64)
    options = {"local_prefill_max_tokens": 128}
    cfg = pd(prefill=p, decode=d, policy="slo_aware", policy_options=options, lease_s=0.5)
    sim = Simulation(poisson_trace(40, lengths, seed=6), cfg)
    result = sim.run()
    summary = result.summary()
    assert summary["finished"] == 400 and summary["preemptions"] > 0
    assert summary["recomputed"] > 0 and summary["kv_stalls"] > 0
    assert any(r.prefill_id is None for r in result.requests)
    assert all(len(r.token_times) == r.output_len for r in result.requests)
    for inst in [*sim.prefill, *sim.decode]:
        assert inst.batcher.free_blocks == inst.batcher.num_blocks
        assert not inst.batcher.has_unfinished()
    assert not any(p.leases for p in sim.prefill)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ((-1.0, 10, 3), "arrival_s"),
        ((0.0, 0, 3), "prompt_len"),
        ((0.0, 10, 1.5), "output_len"),
        ((0.0, 10), "expected"),
        ((0.0, 5000, 3), "never fit a prefill"),
    ],
)
def test_bad_trace_rows(row: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        simulate([row], pd(prefill=PoolSpec(1, model(), 64)))


def test_bad_configs() -> None:
    spec = PoolSpec(1, model(), 64)
    with pytest.raises(ValueError, match="count"):
        PoolSpec(0, model(), 64)
    with pytest.raises(ValueError, match="num_blocks"):
        PoolSpec(1, model(), 0)
    with pytest.raises(ValueError, match="step_time_ratios"):
        PoolSpec(1, model(), 64, step_time_ratios=(1.0, 0.0))
    with pytest.raises(ValueError, match="contended_step_time_ratios must be finite"):
        PoolSpec(1, model(), 64, contended_step_time_ratios=(float("inf"),))
    with pytest.raises(ValueError, match="not both"):
        SimConfig(prefill=spec, colocated=spec)
    with pytest.raises(ValueError, match="decode pool"):
        SimConfig(prefill=spec)
    with pytest.raises(ValueError, match="nope"):
        SimConfig(decode=spec, policy="nope")
    with pytest.raises(ValueError, match="prefill_policy"):
        SimConfig(decode=spec, prefill_policy="lifo")
    with pytest.raises(ValueError, match="bandwidth"):
        SimConfig(decode=spec, bandwidth=0.0)
    with pytest.raises(ValueError, match="without prefill instances"):
        simulate([(0.0, 10, 2)], SimConfig(decode=spec))
    local = {"local_prefill_max_tokens": 32}
    (r,) = simulate(
        [(0.0, 10, 2)], SimConfig(decode=spec, policy="slo_aware", policy_options=local)
    ).requests
    assert r.prefill_id is None and len(r.token_times) == 2
    with pytest.raises(ValueError, match="rate_rps"):
        poisson_trace(0.0, [(1, 1)])


def test_speed_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert speed.main(["--requests", "50", "--instances", "4", "--policies", "slo_aware"]) == 0
    assert "50 requests, 4 instances (P+D), slo_aware" in capsys.readouterr().out
