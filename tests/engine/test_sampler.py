"""Sampler: greedy, filters, seeded batch invariance, empirical distribution, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import Sampler, _filter, make_generator, skip_draws
from engine.sampling_params import SamplingParams

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
GREEDY = SamplingParams(temperature=0.0)


def _logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """Token counts of n draws from logits log(PROBS), 1000 rows per call."""
    sampler = Sampler(seed=seed)
    counts = torch.zeros(len(PROBS))
    for _ in range(n // 1000):
        logits = PROBS.log().expand(1000, -1).clone()
        out = sampler(logits, [params] * 1000, [None] * 1000)
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=len(PROBS))
    return counts


def _chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs / expected_probs.sum() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_rows_take_the_argmax() -> None:
    logits = _logits(6, 50)
    params = [GREEDY, SamplingParams(top_k=1), GREEDY, SamplingParams(top_p=1e-6)] * 2
    out = Sampler(seed=0)(logits[:4], params[:4], [None] * 4)
    assert out.token_ids == logits[:4].argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_top_k_one_and_tiny_top_p_equal_greedy_for_any_seed() -> None:
    logits = _logits(8, 300)
    for seed in range(5):
        gens = [make_generator(seed * 10 + i, "cpu") for i in range(8)]
        for params in (SamplingParams(top_k=1, temperature=5.0), SamplingParams(top_p=1e-6)):
            out = Sampler(seed=seed)(logits, [params] * 8, gens)
            assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.7), {0, 1}),  # 0.5 < 0.7, then 0.8 >= 0.7: stop
        (SamplingParams(top_p=0.85), {0, 1, 2}),
        (SamplingParams(min_p=0.5), {0, 1}),  # keep p >= 0.25
        (SamplingParams(min_p=0.2), {0, 1, 2}),  # keep p >= 0.1
        (SamplingParams(top_k=3, top_p=0.7, min_p=0.01), {0, 1}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(params: SamplingParams, allowed: set[int]) -> None:
    counts = _draws(params, 4000)
    assert {i for i, c in enumerate(counts.tolist()) if c > 0} == allowed
    # Within the kept set the original proportions survive (renormalised).
    kept = torch.tensor(sorted(allowed))
    assert _chi_square(counts[kept], PROBS[kept]) < 20.0


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_temperature(temperature: float) -> None:
    counts = _draws(SamplingParams(temperature=temperature), 20000, seed=1)
    expected = PROBS ** (1.0 / temperature)
    # 3 degrees of freedom: P(chi2 > 20) ~ 2e-4; the seed is fixed so this never flakes.
    assert _chi_square(counts, expected) < 20.0


def _run_seeded(target: SamplingParams, position: int, others: list[SamplingParams]) -> list[int]:
    """Tokens of the row ``target`` at ``position`` among ``others`` over 25 steps."""
    sampler = Sampler()
    params = [*others[:position], target, *others[position:]]
    gens = [make_generator(p.seed, "cpu") for p in params]
    tokens = []
    for step in range(25):
        logits = _logits(len(params), 333, seed=step)
        logits[position] = _logits(1, 333, seed=1000 + step)[0] / 3  # same row every run
        tokens.append(sampler(logits, params, gens).token_ids[position])
    return tokens


def test_seeded_row_is_independent_of_the_batch() -> None:
    target = SamplingParams(temperature=1.5, seed=123)
    alone = _run_seeded(target, 0, [])
    mixed = [
        GREEDY,
        SamplingParams(seed=7, top_k=5),
        SamplingParams(top_p=0.5),  # forces the sort for the whole batch
        SamplingParams(min_p=0.1, logprobs=3),
        SamplingParams(temperature=0.3),
        SamplingParams(seed=123),  # same seed, own generator: no shared state
    ]
    assert _run_seeded(target, 4, mixed) == alone
    assert _run_seeded(target, 0, mixed[1:4]) == alone
    assert len(set(alone)) > 5  # it did sample, not just take the argmax
    assert _run_seeded(SamplingParams(temperature=1.5, seed=124), 0, []) != alone


def _reference_kept(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """Top-k, then top-p on the renormalised top-k set, then min-p: one full sort, float64."""
    probs = torch.softmax(row.double() / p.temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    if p.top_k:
        order = order[: p.top_k]
    mass = float(probs[order].sum())
    kept, before = [], 0.0
    for t in order:
        if p.top_p < 1.0 and before >= p.top_p:
            break
        kept.append(t)
        before += float(probs[t]) / mass
    return {t for t in kept if probs[t] >= p.min_p * probs.max()}


def test_filters_match_a_full_sort_reference_and_ignore_the_batch() -> None:
    vocab = 1000
    flat = _logits(4, vocab, seed=3) / 6  # nuclei of hundreds of tokens: the full-sort path
    peaked = _logits(4, vocab, seed=4) * 2
    rows = torch.cat([flat, peaked])
    params = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=300, top_p=0.95),
        SamplingParams(top_k=7, temperature=0.7),
        SamplingParams(min_p=0.3, top_p=0.99),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=3, top_p=0.8),
        SamplingParams(min_p=0.05, temperature=2.0),
        SamplingParams(),
    ]
    temps = torch.tensor([[p.temperature] for p in params])
    batch = _filter(rows / temps, params)
    for i, p in enumerate(params):
        alone = _filter(rows[i : i + 1] / p.temperature, [p])[0]
        assert torch.equal(alone, batch[i]), i  # bitwise: the batch does not matter
        kept = set(torch.isfinite(alone).nonzero().flatten().tolist())
        assert kept == _reference_kept(rows[i], p), i
        assert torch.equal(alone[list(kept)], (rows[i] / p.temperature)[list(kept)])
    assert len(set(torch.isfinite(batch[0]).nonzero().flatten().tolist())) > 256


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = _logits(16, 100) / 3
    params = [SamplingParams()] * 16
    a = Sampler(seed=5)(logits, params, [None] * 16).token_ids
    b = Sampler(seed=5)(logits, params, [None] * 16).token_ids
    c = Sampler(seed=6)(logits, params, [None] * 16).token_ids
    assert a == b and a != c


def test_logprobs_come_from_the_raw_logits() -> None:
    logits = _logits(3, 60)
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=4),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(),
    ]
    out = Sampler(seed=0)(logits, params, [None] * 3)
    ref = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0]
    assert math.isclose(first.logprob, float(ref[0, out.token_ids[0]]), abs_tol=1e-5)
    values, ids = ref[0].topk(4)
    assert [t for t, _ in first.top] == ids.tolist()
    assert all(
        math.isclose(v, float(r), abs_tol=1e-5) for (_, v), r in zip(first.top, values, strict=True)
    )
    second = out.logprobs[1]
    assert second is not None and second.top == []
    assert math.isclose(second.logprob, float(ref[1].max()), abs_tol=1e-5)
    assert out.logprobs[2] is None


def test_logprobs_larger_than_vocab_are_capped() -> None:
    out = Sampler(seed=0)(_logits(1, 5), [SamplingParams(logprobs=20)], [None])
    assert out.logprobs[0] is not None and len(out.logprobs[0].top) == 5


def test_bad_shapes_raise() -> None:
    sampler = Sampler()
    with pytest.raises(ValueError, match=r"\(10,\)"):
        sampler(torch.zeros(10), [GREEDY], [None])
    with pytest.raises(ValueError, match="2 rows"):
        sampler(torch.zeros(2, 10), [GREEDY], [None, None])
    with pytest.raises(ValueError, match="1 generators"):
        sampler(torch.zeros(2, 10), [GREEDY, GREEDY], [None])
    with pytest.raises(ValueError, match="floating"):
        sampler(torch.zeros(1, 10, dtype=torch.long), [GREEDY], [None])


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    gen = make_generator(9, "cpu")
    assert gen is not None
    ref = torch.Generator().manual_seed(9)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=ref))


def test_large_mixed_batch() -> None:
    batch, vocab = 256, 8192
    kinds = [GREEDY, SamplingParams(top_k=40), SamplingParams(top_p=0.9, seed=1), SamplingParams()]
    params = [kinds[i % 4] for i in range(batch)]
    gens = [make_generator(p.seed, "cpu") for p in params]
    logits = _logits(batch, vocab)
    out = Sampler(seed=0)(logits, params, gens)
    assert len(out.token_ids) == batch and all(0 <= t < vocab for t in out.token_ids)
    assert out.token_ids[::4] == logits[::4].argmax(-1).tolist()


def test_skip_draws_continues_a_seeded_stream() -> None:
    """A generator made later for the same seed, skipped past the tokens already
    sampled, draws what the original would have drawn next."""
    original = make_generator(7, "cpu")
    assert original is not None
    for _ in range(3):
        torch.rand(1, generator=original)
    later = make_generator(7, "cpu")
    assert later is not None
    skip_draws(later, 3)
    assert torch.equal(torch.rand(1, generator=later), torch.rand(1, generator=original))
    with pytest.raises(ValueError, match="num_tokens must be >= 0, got -1"):
        skip_draws(later, -1)
