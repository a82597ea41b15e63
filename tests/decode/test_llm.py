"""The single-instance engine: batching, preemption, aborts, stops, bad requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_llm(path: Path, num_blocks: int = 64, **sched: object) -> LLM:
    return LLM(
        EngineConfig(
            model=str(path),
            dtype="float32",
            num_threads=2,
            cache=CacheConfig(num_blocks=num_blocks, block_size=16),
            scheduler=SchedulerConfig(**sched),  # type: ignore[arg-type]
        )
    )


PROMPTS = [
    "Hello there, how are you",
    "The quick brown fox jumps",
    "Once upon a time",
    "A B C D E F G",
    "zebra",
]


def test_batch_equals_one_by_one(tiny_llama: Path) -> None:
    llm = make_llm(tiny_llama)
    together = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert together == alone
    llm.block_manager.check_invariants([])


def test_preemption_by_recompute_keeps_tokens(tiny_llama: Path) -> None:
    reference = [o.token_ids for o in make_llm(tiny_llama).generate(PROMPTS, GREEDY)]
    # 6 blocks of 16 cannot hold 5 sequences of ~30 tokens: some must be preempted.
    small = make_llm(tiny_llama, num_blocks=6)
    outs = small.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert small.scheduler.num_preemptions > 0
    small.block_manager.check_invariants([])


def test_no_chunked_prefill_same_tokens(tiny_llama: Path) -> None:
    ref = [o.token_ids for o in make_llm(tiny_llama).generate(PROMPTS, GREEDY)]
    llm = make_llm(tiny_llama, chunked_prefill=False, max_num_batched_tokens=8)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == ref


def test_abort_frees_blocks_and_others_finish(tiny_llama: Path) -> None:
    llm = make_llm(tiny_llama)
    keep = llm.add_request(PROMPTS[0], GREEDY)
    drop = llm.add_request(PROMPTS[1], GREEDY)
    llm.step()
    assert llm.abort(drop)
    assert not llm.abort("no-such-request")
    outs = []
    while llm.has_unfinished():
        outs += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in outs] == [keep]
    assert llm.block_manager.stats().used == 0
    llm.block_manager.check_invariants([])


def test_stop_token_and_max_tokens(tiny_llama: Path) -> None:
    llm = make_llm(tiny_llama)
    free_run = llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    stop_at = free_run[5]
    first = free_run.index(stop_at)
    params = SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_at]
    )
    out = llm.generate([PROMPTS[0]], params)[0]
    assert out.token_ids == free_run[: first + 1]
    assert out.finish_reason == "stop"
    short = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=3))[0]
    assert len(short.token_ids) <= 3


def test_stop_string_truncates_text(tiny_llama: Path) -> None:
    llm = make_llm(tiny_llama)
    full = llm.generate([PROMPTS[2]], GREEDY)[0]
    if len(full.text) < 6:
        pytest.skip("model produced too little text")
    stop = full.text[3:6]
    out = llm.generate(
        [PROMPTS[2]], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]


def test_seeded_sampling_independent_of_batch(tiny_llama: Path) -> None:
    llm = make_llm(tiny_llama)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate([PROMPTS[3], PROMPTS[0], PROMPTS[1]], [other, params, other])
    assert mixed[1].token_ids == alone


def test_logprobs_returned(tiny_llama: Path) -> None:
    llm = make_llm(tiny_llama)
    out = llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    )[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", "empty"),
        ([], "empty"),
        ([10**6], "outside the vocabulary"),
        ([1] * 600, "max_model_len"),
    ],
)
def test_bad_request_rejected_others_unharmed(
    tiny_llama: Path, prompt: str | list[int], match: str
) -> None:
    llm = make_llm(tiny_llama)
    ref = llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    rid = llm.add_request(PROMPTS[0], GREEDY)
    llm.step()
    with pytest.raises(ValueError, match=match):
        llm.add_request(prompt, GREEDY)
    outs = []
    while llm.has_unfinished():
        outs += [o for o in llm.step() if o.finished]
    assert [(o.request_id, o.token_ids) for o in outs] == [(rid, ref)]


def test_duplicate_request_id_rejected(tiny_llama: Path) -> None:
    llm = make_llm(tiny_llama)
    llm.add_request(PROMPTS[0], GREEDY, request_id="same")
    with pytest.raises(ValueError, match="same"):
        llm.add_request(PROMPTS[1], GREEDY, request_id="same")
