"""Routing policies on synthetic instances: exact decisions for round robin, least
loaded and slo_aware (joint choice, admission, conditional disaggregation, prefix
reuse), the fast paths against brute force, and errors that name the bad value."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence

import pytest

from router.bandwidth import Bandwidth
from router.latency_model import LatencyModel
from router.policies import POLICY_NAMES, LeastLoaded, RoundRobin, SloAware, make_policy
from router.policy_views import Decision, DecodeView, PrefillView, RouteRequest
from router.step_fit import Coefficients

# prefill: 10 ms + 0.1 ms per token; decode: 10 ms + 1 µs per context token + 1 ms per seq.
MODEL = LatencyModel(Coefficients(0.01, 1e-4, 0.0), Coefficients(0.01, 1e-6, 1e-3))
BW = 1e9  # bytes/s


def pv(name: str, queued: int = 0, requests: int = 1, blocks_free: int = 1000) -> PrefillView:
    return PrefillView(name, queued, requests if queued else 0, blocks_free, 16, MODEL)


def dv(name: str, batch: int = 0, context: int = 0, blocks_free: int = 4000) -> DecodeView:
    return DecodeView(name, batch, context, 0, blocks_free, 16, 64, MODEL)


def req(
    prompt_len: int = 1000,
    cached: Mapping[str, int] | None = None,
    kv_bytes_per_token: float = 1e3,
    ttft_s: float = 0.5,
    tpot_s: float = 0.05,
) -> RouteRequest:
    return RouteRequest(prompt_len, ttft_s, tpot_s, kv_bytes_per_token, 128, cached or {})


def pair(d: Decision) -> tuple[str | None, str]:
    return d.prefill_id, d.decode_id


# p0: 6000 queued tokens (0.61 s of work) -> TTFT 0.72 s, misses 0.5 s; p1 idle: 0.11 s.
PREFILL = [pv("p0", queued=6000), pv("p1")]
# d0: 60 seqs, 60k context -> TPOT 0.132 s, misses 0.05 s; d1: 4 seqs -> 0.020 s.
DECODE = [dv("d0", batch=60, context=60_000), dv("d1", batch=4, context=4000)]


def test_round_robin_cycles_each_pool_independently() -> None:
    policy = RoundRobin(bandwidth=BW)
    prefill = [pv("p0"), pv("p1"), pv("p2")]
    got = [pair(policy.decide(req(), prefill, DECODE)) for _ in range(4)]
    assert got == [("p0", "d0"), ("p1", "d1"), ("p2", "d0"), ("p0", "d1")]


def test_least_loaded_picks_the_least_loaded() -> None:
    prefill = [pv("p0", 500, 2), pv("p1", 100, 1), pv("p2", 100, 3)]
    decode = [dv("d0", 8, 800, blocks_free=100), dv("d1", 3), dv("d2", 3, blocks_free=5000)]
    d = LeastLoaded(bandwidth=BW).decide(req(), prefill, decode)
    assert pair(d) == ("p1", "d2") and d.reason.startswith("least_loaded")


def test_slo_aware_meets_the_slos_where_round_robin_does_not() -> None:
    rr = RoundRobin(bandwidth=BW).decide(req(), PREFILL, DECODE)
    assert pair(rr) == ("p0", "d0") and not rr.meets_slo and rr.admit
    d = SloAware(bandwidth=BW).decide(req(), PREFILL, DECODE)
    assert pair(d) == ("p1", "d1") and d.meets_slo and d.admit
    assert d.predicted_ttft_s == pytest.approx(0.01 + 0.1 + 1e6 / BW)
    assert d.predicted_tpot_s == pytest.approx(0.01 + 5000e-6 + 5e-3)
    assert "p1 -> d1 meets both SLOs" in d.reason


def test_joint_choice_beats_side_by_side_when_bandwidth_differs_per_pair() -> None:
    prefill = [pv("p0"), pv("p1", queued=2000)]  # TTFT before transfer: 0.11 s, 0.32 s
    decode = [dv("d0", 4, 4000), dv("d1", 20, 20_000)]  # TPOT: 0.020 s, 0.052 s
    slow = Bandwidth(BW, per_pair={("p0", "d0"): 2.5e8})  # 100 MB of KV: 0.4 s on p0->d0
    r = req(kv_bytes_per_token=1e5, ttft_s=0.5, tpot_s=0.08)
    # Side by side: the best prefill (p0) and the best decode (d0) apart: 0.51 s > 0.5 s.
    side = SloAware(bandwidth=slow).pair_decision(r, prefill[0], decode[0], "side by side")
    assert not side.meets_slo and side.predicted_ttft_s == pytest.approx(0.11 + 0.4)
    joint = SloAware(bandwidth=slow).decide(r, prefill, decode)
    assert pair(joint) == ("p0", "d1") and joint.meets_slo
    assert joint.predicted_ttft_s == pytest.approx(0.11 + 0.1)
    # With one figure for every pair the decomposition picks the separate optima.
    assert pair(SloAware(bandwidth=BW).decide(r, prefill, decode)) == ("p0", "d0")


def test_reject_when_nothing_meets_and_serve_the_closest_otherwise() -> None:
    prefill = [pv("p0", queued=6000), pv("p1", queued=9000)]
    r = req()
    rejected = SloAware(bandwidth=BW, on_slo_miss="reject").decide(r, prefill, DECODE)
    assert not rejected.meets_slo and not rejected.admit
    assert pair(rejected) == ("p0", "d1") and "no candidate meets" in rejected.reason
    served = SloAware(bandwidth=BW).decide(r, prefill, DECODE)
    assert pair(served) == ("p0", "d1") and served.admit and not served.meets_slo
    fine = SloAware(bandwidth=BW, on_slo_miss="reject").decide(r, PREFILL, DECODE)
    assert fine.admit and fine.meets_slo


def test_no_room_counts_as_a_miss_and_is_avoided() -> None:
    decode = [dv("d0", 1, 1000, blocks_free=10), dv("d1", 4, 4000)]  # d0 lacks 63 blocks
    d = SloAware(bandwidth=BW).decide(req(), PREFILL, decode)
    assert pair(d) == ("p1", "d1")
    full = SloAware(bandwidth=BW).decide(req(), PREFILL, decode[:1])
    assert pair(full) == ("p1", "d0") and not full.meets_slo and "no room now" in full.reason
    assert not PrefillView("p", 0, 0, 10, 16, MODEL).has_room(req())


def test_conditional_disaggregation_prefills_short_prompts_locally() -> None:
    busy = [pv("p0", queued=3000), pv("p1", queued=3000)]  # 0.32 s before any prompt
    on = SloAware(bandwidth=BW, local_prefill_max_tokens=256)
    d = on.decide(req(prompt_len=64), busy, DECODE)
    assert pair(d) == (None, "d1") and d.meets_slo and "local prefill on d1" in d.reason
    ttft, tpot = DECODE[1].local_prefill(req(prompt_len=64))
    assert d.predicted_ttft_s == ttft == pytest.approx(0.018 + 0.0164)  # running step + prefill
    assert tpot == pytest.approx(DECODE[1].tpot_s(req(prompt_len=64)) + 0.0164 / 127)
    # Long uncached prompts still go remote; so does everything with local prefill off.
    assert pair(on.decide(req(prompt_len=1000), busy, DECODE)) == ("p0", "d1")
    off = SloAware(bandwidth=BW)
    assert pair(off.decide(req(prompt_len=64), busy, DECODE)) == ("p0", "d1")


def test_conditional_disaggregation_prefills_mostly_cached_prompts_locally() -> None:
    on = SloAware(bandwidth=BW, local_prefill_max_tokens=256)
    mostly_cached = req(prompt_len=3000, cached={"d1": 2900})
    d = on.decide(mostly_cached, PREFILL, DECODE)
    assert pair(d) == (None, "d1") and "(100 uncached tokens)" in d.reason
    # Not when the local prefill would miss the SLO: an idle prefill pool, short prompt,
    # and a decode batch whose TPOT the stall would push past the SLO.
    tight = req(prompt_len=250, tpot_s=0.0194)
    assert pair(on.decide(tight, PREFILL, DECODE)) == ("p1", "d1")


def test_local_prefill_is_never_chosen_when_disabled() -> None:
    rng = random.Random(7)
    policy = SloAware(bandwidth=BW)
    for _ in range(50):
        prefill = [pv(f"p{i}", rng.randint(0, 20_000), 3) for i in range(3)]
        decode = [dv(f"d{i}", rng.randint(0, 60), rng.randint(0, 50_000)) for i in range(3)]
        r = req(prompt_len=rng.randint(1, 64), cached={"d0": 64})
        assert policy.decide(r, prefill, decode).prefill_id is not None


def test_cached_prefix_lowers_ttft() -> None:
    prefill = [pv("p0"), pv("p1")]
    policy = SloAware(bandwidth=BW)
    plain = policy.decide(req(), prefill, DECODE)
    cached = policy.decide(req(cached={"p1": 900}), prefill, DECODE)
    assert plain.prefill_id == "p0" and cached.prefill_id == "p1"
    assert plain.predicted_ttft_s - cached.predicted_ttft_s == pytest.approx(900 * 1e-4)


def test_a_prefix_cached_on_the_decode_instance_shortens_the_transfer() -> None:
    r = req(kv_bytes_per_token=1e5, cached={"d1": 600})  # 100 MB, 60 MB already on d1
    prefill, decode = [pv("p0")], [dv("d0", 4, 4000), dv("d1", 4, 4000)]
    d = SloAware(bandwidth=BW).decide(r, prefill, decode)
    assert pair(d) == ("p0", "d1") and d.predicted_ttft_s == pytest.approx(0.11 + 0.04)
    assert r.kv_bytes_to("d1") == 4e7 and r.kv_bytes_to("d0") == r.kv_bytes == 1e8


def test_transfer_in_tpot_spreads_the_transfer_over_the_output() -> None:
    r = req(kv_bytes_per_token=1e5)  # 100 MB: 0.1 s at 1 GB/s
    d = SloAware(bandwidth=BW, transfer_in="tpot").decide(r, PREFILL, DECODE)
    assert d.predicted_ttft_s == pytest.approx(0.11)
    assert d.predicted_tpot_s == pytest.approx(0.02 + 0.1 / 127)


def brute_force(
    policy: SloAware, r: RouteRequest, prefill: Sequence[PrefillView], decode: Sequence[DecodeView]
) -> tuple[str, str]:
    def key(p: PrefillView, d: DecodeView) -> tuple[float, float]:
        x = policy.pair_decision(r, p, d, "")
        rt = x.predicted_ttft_s / r.ttft_s + (0 if p.has_room(r) else 1e3)
        ro = x.predicted_tpot_s / r.tpot_s + (0 if d.has_room(r) else 1e3)
        return max(rt, ro), rt + ro

    best = min(itertools.product(prefill, decode), key=lambda pd: key(*pd))
    return best[0].instance_id, best[1].instance_id


def figures_fn(figures: dict[tuple[str, str], float]) -> Callable[[str, str], float]:
    return lambda p, d: figures[(p, d)]


@pytest.mark.parametrize("transfer_in", ["ttft", "tpot"])
@pytest.mark.parametrize("uniform", [True, False])
def test_fast_paths_match_brute_force(uniform: bool, transfer_in: str) -> None:
    rng = random.Random(11)
    for trial in range(40):
        prefill = [
            pv(f"p{i}", rng.randint(0, 9000), rng.randint(1, 5), rng.randint(0, 300))
            for i in range(5)
        ]
        decode = [
            dv(f"d{i}", rng.randint(0, 64), rng.randint(0, 60_000), rng.randint(0, 4000))
            for i in range(4)
        ]
        figures = {
            (p.instance_id, d.instance_id): rng.choice([1e8, 1e9, 1e10])
            for p in prefill
            for d in decode
        }
        bw = Bandwidth(BW)
        if not uniform:  # per-pair figures as a mapping or as a callable
            bw = Bandwidth(per_pair=figures) if trial % 2 else Bandwidth(fn=figures_fn(figures))
        policy = SloAware(bandwidth=bw, transfer_in=transfer_in)
        r = req(
            prompt_len=rng.randint(1, 3000),
            kv_bytes_per_token=rng.choice([1e3, 1e5]),
            cached={
                f"p{rng.randint(0, 4)}": rng.randint(0, 2000),
                f"d{rng.randint(0, 3)}": rng.randint(0, 2000),
            },
        )
        assert pair(policy.decide(r, prefill, decode)) == brute_force(policy, r, prefill, decode), (
            trial
        )


def test_views_estimate_queues_with_the_token_budget() -> None:
    view = PrefillView("p", 5000, 5, 1000, 16, MODEL, max_num_batched_tokens=2048)
    assert view.queue_s == pytest.approx(3 * 0.01 + 0.5)  # 3 steps of <= 2048 tokens
    assert PrefillView("p", 5000, 5, 1000, 16, MODEL).queue_s == pytest.approx(5 * 0.01 + 0.5)
    d = DecodeView("d", 4, 4000, 2, 4000, 16, 64, MODEL, pending_tokens=2000)
    assert d.tpot_s(req()) == pytest.approx(0.01 + 7000e-6 + 7e-3)
    assert req(cached={"p": 5000}).uncached("p") == 1 and req().kv_bytes == 1e6


def test_plus_adds_the_routed_request_so_a_burst_spreads() -> None:
    prefill, decode = [pv("p0"), pv("p1")], [dv("d0"), dv("d1")]
    policy = SloAware(bandwidth=BW)
    got = []
    for _ in range(4):
        r = req()
        d = policy.decide(r, prefill, decode)
        got.append(pair(d))
        i = next(k for k, v in enumerate(prefill) if v.instance_id == d.prefill_id)
        j = next(k for k, v in enumerate(decode) if v.instance_id == d.decode_id)
        prefill[i], decode[j] = prefill[i].plus(r), decode[j].plus(r, local=False)
    assert got == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]
    assert prefill[0].queued_prefill_tokens == 2000 and prefill[0].queued_requests == 2
    assert prefill[0].blocks_free == 1000 - 2 * 63
    assert (decode[1].pending_handoffs, decode[1].pending_tokens) == (2, 2000)
    local = dv("d2").plus(req(cached={"d2": 990}), local=True)
    assert local.local_prefill_tokens == 10 and local.pending_handoffs == 1


def test_make_policy_and_its_errors() -> None:
    assert POLICY_NAMES == ("round_robin", "least_loaded", "slo_aware")
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    p = make_policy("slo_aware", bandwidth=2e9, on_slo_miss="reject", local_prefill_max_tokens=64)
    assert isinstance(p, SloAware) and p.bandwidth.default == 2e9 and p.on_slo_miss == "reject"
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="'round_robin' has no option 'local_prefill_max_tokens'"):
        make_policy("round_robin", local_prefill_max_tokens=8)
    with pytest.raises(ValueError, match="on_slo_miss must be one of .* got 'drop'"):
        make_policy("slo_aware", on_slo_miss="drop")
    with pytest.raises(ValueError, match="transfer_in must be one of"):
        make_policy("least_loaded", transfer_in="e2e")
    with pytest.raises(ValueError, match="local_prefill_max_tokens must be an int >= 0, got -1"):
        make_policy("slo_aware", local_prefill_max_tokens=-1)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="need at least one instance per pool, got 0 prefill"):
        SloAware().decide(req(), [], DECODE)
    with pytest.raises(ValueError, match="got 2 prefill and 0 decode"):
        RoundRobin().decide(req(), PREFILL, [])
    with pytest.raises(ValueError, match="over local_prefill_max_tokens"):
        SloAware(local_prefill_max_tokens=8).decide(req(), [], DECODE)
    assert (
        SloAware(local_prefill_max_tokens=8).decide(req(prompt_len=4), [], DECODE).prefill_id
        is None
    )
    with pytest.raises(ValueError, match="queued_requests must be >= 0, got -1"):
        PrefillView("p", 0, -1, 10, 16, MODEL)
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        DecodeView("d", 0, 0, 0, 10, 0, 64, MODEL)
    with pytest.raises(ValueError, match="pending_tokens must be >= 0"):
        DecodeView("d", 0, 0, 0, 10, 16, 64, MODEL, pending_tokens=-5)
    with pytest.raises(ValueError, match="prompt_len must be >= 1, got 0"):
        req(prompt_len=0)
    with pytest.raises(ValueError, match="SLOs must be > 0"):
        req(ttft_s=0)
    with pytest.raises(ValueError, match="bandwidth default must be a finite number > 0"):
        Bandwidth(-1.0)
    with pytest.raises(ValueError, match=r"matrix shape \(1, 2\) != \(2, 2\)"):
        Bandwidth.from_matrix(["p0", "p1"], ["d0", "d1"], [[1e9, 1e9]])
    m = Bandwidth.from_matrix(["p0"], ["d0", "d1"], [[1e9, 2e9]])
    assert m.between("p0", "d1") == 2e9 and not m.is_uniform and Bandwidth().is_uniform


# ------------------------------------------------------------------ colocated


def test_colocated_round_robin_takes_instances_in_turn_with_local_latency() -> None:
    policy = RoundRobin(bandwidth=BW)
    got = [policy.decide_colocated(req(prompt_len=64), DECODE) for _ in range(3)]
    assert [pair(d) for d in got] == [(None, "d0"), (None, "d1"), (None, "d0")]
    ttft, tpot = DECODE[1].local_prefill(req(prompt_len=64))
    assert (got[1].predicted_ttft_s, got[1].predicted_tpot_s) == (ttft, tpot)
    assert got[1].meets_slo and not got[0].meets_slo and got[0].admit  # d0's TPOT misses
    assert "colocated" in got[0].reason


def test_colocated_least_loaded_counts_running_waiting_and_routed_requests() -> None:
    decode = [
        DecodeView("d0", 2, 200, 0, 100, 16, 64, MODEL, waiting_requests=2),  # 4 requests
        DecodeView("d1", 3, 300, 0, 100, 16, 64, MODEL),  # 3
        DecodeView("d2", 1, 100, 0, 500, 16, 64, MODEL, waiting_requests=2),  # 3, roomier
    ]
    policy = LeastLoaded(bandwidth=BW)
    assert pair(policy.decide_colocated(req(), decode)) == (None, "d2")
    decode[2] = decode[2].plus(req(), local=True)  # routed there: now 4
    assert pair(policy.decide_colocated(req(), decode)) == (None, "d1")


def test_colocated_slo_aware_prefills_any_prompt_where_it_best_meets_the_slos() -> None:
    policy = SloAware(bandwidth=BW)  # local_prefill_max_tokens 0: not for colocated
    d = policy.decide_colocated(req(prompt_len=3000), DECODE)
    assert pair(d) == (None, "d1") and "local prefill on d1 (3000 uncached" in d.reason
    assert (d.predicted_ttft_s, d.predicted_tpot_s) == DECODE[1].local_prefill(req(3000))
    # The same choice as conditional disaggregation without prefill instances.
    unbounded = SloAware(bandwidth=BW, local_prefill_max_tokens=1 << 40)
    assert unbounded.decide(req(prompt_len=3000), [], DECODE) == d
    strict = SloAware(bandwidth=BW, on_slo_miss="reject")
    rejected = strict.decide_colocated(req(prompt_len=3000, ttft_s=1e-3), DECODE)
    assert not rejected.admit and not rejected.meets_slo and "no candidate" in rejected.reason


def test_colocated_decisions_need_an_instance() -> None:
    for name in POLICY_NAMES:
        with pytest.raises(ValueError, match="at least one instance in a colocated"):
            make_policy(name).decide_colocated(req(), [])
    with pytest.raises(ValueError, match="waiting_requests must be >= 0, got -1"):
        DecodeView("d", 0, 0, 0, 10, 16, 64, MODEL, waiting_requests=-1)
