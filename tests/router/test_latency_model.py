"""The step latency model: fits recover known coefficients, online refinement tracks a
change, degenerate data fall back sanely, bad input raises ValueError naming it."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from router.latency_model import (
    DEFAULT_DECODE_PRIOR,
    DEFAULT_PREFILL_PRIOR,
    DecodeSample,
    LatencyModel,
    PrefillSample,
)
from router.latency_profile import geometric, profiling_plan
from router.step_fit import Coefficients, StepModel, full_rank, nnls3

PREFILL = Coefficients(a=0.02, b=3e-4, c=5e-8)
DECODE = Coefficients(a=0.015, b=4e-6, c=8e-4)


def prefill_samples(
    true: Coefficients, n: int, noise: float, rng: random.Random
) -> list[PrefillSample]:
    out = []
    for _ in range(n):
        lengths = tuple(rng.randint(16, 4096) for _ in range(rng.randint(1, 4)))
        t = true.predict(sum(lengths), sum(x * x for x in lengths))
        out.append(PrefillSample(lengths, t * (1 + noise * rng.gauss(0, 1))))
    return out


def decode_samples(
    true: Coefficients, n: int, noise: float, rng: random.Random
) -> list[DecodeSample]:
    out = []
    for _ in range(n):
        bs = rng.randint(1, 128)
        ctx = bs * rng.randint(16, 2048)
        out.append(DecodeSample(bs, ctx, true.predict(ctx, bs) * (1 + noise * rng.gauss(0, 1))))
    return out


def assert_close(got: Coefficients, want: Coefficients, rel: float) -> None:
    for name in ("a", "b", "c"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=rel), name


def test_fit_recovers_known_coefficients_from_noisy_samples() -> None:
    rng = random.Random(0)
    model = LatencyModel()
    model.fit([*prefill_samples(PREFILL, 200, 0.03, rng), *decode_samples(DECODE, 200, 0.03, rng)])
    assert_close(model.prefill.coefficients, PREFILL, rel=0.1)
    assert_close(model.decode.coefficients, DECODE, rel=0.1)
    assert model.predict_prefill([1000, 500]) == pytest.approx(
        PREFILL.predict(1500, 1000**2 + 500**2), rel=0.02
    )
    assert model.predict_decode(32, 32 * 512) == pytest.approx(
        DECODE.predict(32 * 512, 32), rel=0.02
    )
    err = model.to_dict()["prefill"]["relative_error"]
    assert 0.01 < err < 0.04  # ~ the 3% noise


def test_fit_on_exact_samples_is_exact_and_non_negative() -> None:
    rng = random.Random(1)
    no_quadratic = Coefficients(0.01, 2e-4, 0.0)
    model = LatencyModel()
    model.fit(prefill_samples(no_quadratic, 50, 0.0, rng))
    c = model.prefill.coefficients
    assert min(c.a, c.b, c.c) >= 0 and c.c < 1e-12  # noise-free: no spurious quadratic
    assert c.a == pytest.approx(0.01, rel=1e-3) and c.b == pytest.approx(2e-4, rel=1e-3)


def test_online_refinement_tracks_a_change_in_the_true_coefficients() -> None:
    rng = random.Random(2)
    model = LatencyModel(window=128, refit_every=8)
    model.fit(decode_samples(DECODE, 100, 0.02, rng))
    slower = Coefficients(a=0.03, b=8e-6, c=1.6e-3)  # the instance got twice as slow
    for sample in decode_samples(slower, 200, 0.02, rng):
        assert model.observe(sample)
    assert_close(model.decode.coefficients, slower, rel=0.1)
    assert model.predict_decode(16, 16 * 1024) == pytest.approx(slower.predict(16384, 16), rel=0.03)
    assert model.decode.num_observed == 300


def test_observe_refits_only_every_n_observations() -> None:
    rng = random.Random(3)
    model = LatencyModel(refit_every=4)
    samples = prefill_samples(PREFILL, 4, 0.0, rng)
    for s in samples[:3]:
        model.observe(s)
    assert model.prefill.coefficients == DEFAULT_PREFILL_PRIOR
    model.observe(samples[3])
    assert model.prefill.coefficients != DEFAULT_PREFILL_PRIOR


def test_no_samples_predict_the_prior() -> None:
    model = LatencyModel()
    assert model.prefill.coefficients == DEFAULT_PREFILL_PRIOR
    assert model.decode.coefficients == DEFAULT_DECODE_PRIOR
    assert model.predict_prefill([100]) == pytest.approx(DEFAULT_PREFILL_PRIOR.predict(100, 1e4))
    model.fit([])
    assert model.prefill.coefficients == DEFAULT_PREFILL_PRIOR


def test_one_sample_rescales_the_prior_to_fit_it() -> None:
    model = LatencyModel()
    model.fit([PrefillSample((512,), 0.5)])
    c, p = model.prefill.coefficients, DEFAULT_PREFILL_PRIOR
    assert model.predict_prefill([512]) == pytest.approx(0.5)
    assert c.b / c.a == pytest.approx(p.b / p.a) and c.c / c.a == pytest.approx(p.c / p.a)
    assert model.decode.coefficients == DEFAULT_DECODE_PRIOR  # untouched phase


def test_collinear_samples_are_degenerate_and_rescale_the_prior() -> None:
    # context = 256 × batch everywhere: context and batch size cannot be told apart.
    samples = [DecodeSample(bs, 256 * bs, 0.01 + 0.001 * bs) for bs in (1, 2, 4, 8, 16)]
    model = LatencyModel()
    model.fit(samples)
    c, p = model.decode.coefficients, DEFAULT_DECODE_PRIOR
    assert c.b / c.a == pytest.approx(p.b / p.a)
    for s in samples:  # a sane fit: right order of magnitude everywhere
        assert 0.3 < model.predict_decode(s.batch_size, s.context_tokens) / s.seconds < 3


def test_zero_and_bad_times() -> None:
    model = LatencyModel()
    with pytest.raises(ValueError, match="sample 1: seconds must be finite and > 0, got 0.0"):
        model.fit([PrefillSample((10,), 0.1), PrefillSample((10,), 0.0)])
    assert not model.observe(DecodeSample(4, 100, 0.0))  # a coarse clock: ignored
    assert model.decode.num_observed == 0
    with pytest.raises(ValueError, match="seconds must be finite and >= 0, got -1"):
        DecodeSample(4, 100, -1.0)
    with pytest.raises(ValueError, match="nan"):
        PrefillSample((10,), math.nan)
    with pytest.raises(ValueError, match="token_lengths must be >= 0"):
        PrefillSample((10, -1), 0.1)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        DecodeSample(0, 0, 0.1)
    with pytest.raises(ValueError, match="token lengths must be >= 0"):
        model.predict_prefill([-3])
    with pytest.raises(ValueError, match="not a PrefillSample"):
        model.observe("step")  # type: ignore[arg-type]
    assert model.predict_prefill([]) == 0.0 and model.predict_decode(0, 0) == 0.0


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="coefficient b must be finite and >= 0, got -1"):
        Coefficients(0.1, -1.0, 0.0)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        LatencyModel(window=0)
    with pytest.raises(ValueError, match="refit_every must be >= 1"):
        LatencyModel(refit_every=0)
    with pytest.raises(ValueError, match="prior_weight"):
        LatencyModel(prior_weight=0.0)
    with pytest.raises(ValueError, match="must predict > 0 s"):
        LatencyModel(prefill_prior=Coefficients(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="need >= 3 prior points"):
        StepModel(PREFILL, [(1.0, 1.0)])


def test_serialization_round_trip() -> None:
    rng = random.Random(4)
    model = LatencyModel(window=64)
    model.fit(prefill_samples(PREFILL, 30, 0.01, rng))
    data = json.loads(json.dumps(model.to_dict()))
    assert data["prefill"]["window_samples"] == 30 and data["window"] == 64
    again = LatencyModel.from_dict(data)
    assert again.prefill.coefficients == model.prefill.coefficients
    assert again.decode.coefficients == model.decode.coefficients
    assert again.prefill.window == 64
    with pytest.raises(ValueError, match="bad latency model data"):
        LatencyModel.from_dict({"prefill": {"a": 1}})


def test_nnls3_meets_the_kkt_conditions() -> None:
    rng = np.random.default_rng(5)
    for _ in range(300):
        z = rng.standard_normal((8, 3)) * rng.uniform(0.01, 100, 3)
        gram, rhs = z.T @ z, z.T @ rng.standard_normal(8)
        theta = nnls3(gram, rhs)
        if theta is None:
            assert (rhs <= 1e-9).all()
            continue
        th = np.array(theta)
        grad, tol = gram @ th - rhs, 1e-7 * (1 + np.abs(gram).max() + np.abs(rhs).max())
        assert (th >= 0).all()
        assert (np.abs(grad[th > 0]) < tol).all() and (grad[th == 0] > -tol).all()


def test_full_rank() -> None:
    x = np.array([[1.0, 2, 4], [1, 3, 6], [1, 5, 10]])  # third column = 2 × second
    assert not full_rank(x.T @ x)
    y = np.array([[1.0, 2, 4], [1, 3, 9], [1, 5, 25]])  # (1, l, l²): independent
    assert full_rank(y.T @ y)


def test_profiling_plan_pins_down_the_model() -> None:
    plan = profiling_plan(
        max_num_batched_tokens=2048, max_num_seqs=64, max_model_len=4096, kv_capacity_tokens=65536
    )
    assert plan.prefill_batches[0] == (16,) and (2048,) in plan.prefill_batches
    assert any(len(b) > 1 for b in plan.prefill_batches)
    assert all(sum(b) <= 2048 for b in plan.prefill_batches)
    assert all(bs <= 64 and ctx <= 65536 for bs, ctx in plan.decode_points)
    assert {bs for bs, _ in plan.decode_points} == {1, 3, 8, 23, 64}
    samples: list[PrefillSample | DecodeSample] = [
        PrefillSample(b, PREFILL.predict(sum(b), sum(x * x for x in b)))
        for b in plan.prefill_batches
    ]
    samples += [DecodeSample(bs, ctx, DECODE.predict(ctx, bs)) for bs, ctx in plan.decode_points]
    model = LatencyModel()
    model.fit(samples * plan.repeats)
    # The prior (c 50x too small) still pulls a little on the least determined term.
    assert_close(model.prefill.coefficients, PREFILL, rel=0.02)
    assert_close(model.decode.coefficients, DECODE, rel=0.02)
    assert plan.estimated_seconds(model) > 0 and plan.to_dict()["repeats"] == 3


def test_profiling_plan_errors() -> None:
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        profiling_plan(
            max_num_batched_tokens=64, max_num_seqs=0, max_model_len=64, kv_capacity_tokens=64
        )
    with pytest.raises(ValueError, match="num_points must be >= 3"):
        profiling_plan(
            max_num_batched_tokens=64,
            max_num_seqs=4,
            max_model_len=64,
            kv_capacity_tokens=64,
            num_points=2,
        )
    with pytest.raises(ValueError, match="below min_tokens"):
        profiling_plan(
            max_num_batched_tokens=8, max_num_seqs=4, max_model_len=64, kv_capacity_tokens=64
        )
    assert geometric(16, 16, 5) == [16] and geometric(1, 64, 3) == [1, 8, 64]
