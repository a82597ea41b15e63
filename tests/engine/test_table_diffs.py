"""Per-step messages carry block-table diffs (DESIGN.md), and the runner rebuilds the
whole tables from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from decode.llm import LLM
from engine.block_manager import BlockManager
from engine.config import CacheConfig, EngineConfig
from engine.model_runner import SeqStep
from engine.requests import BlockTableDiffs
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_diffs_append_then_reset() -> None:
    bm = BlockManager(16, 4)
    seq = Sequence("a", list(range(1, 10)), SamplingParams())
    diffs = BlockTableDiffs()
    assert bm.allocate_slots(seq, 9)
    assert diffs.diff("a", seq.block_table) == (seq.block_table, False)
    assert diffs.diff("a", seq.block_table) == ([], True)
    seq.num_computed_tokens = 9
    seq.append_token(5)
    seq.token_ids.extend([6, 7, 8])
    assert bm.allocate_slots(seq, 4)
    assert diffs.diff("a", seq.block_table) == (seq.block_table[3:], True)
    bm.free(seq)  # preemption: a new table follows
    assert bm.allocate_slots(seq, 5)
    assert diffs.diff("a", seq.block_table) == (seq.block_table, False)
    diffs.forget(["a"])
    assert diffs.diff("a", seq.block_table)[1] is False


def test_decode_steps_send_only_new_blocks(tiny_llama: Path) -> None:
    llm = LLM(EngineConfig(model=str(tiny_llama), cache=CacheConfig(num_blocks=64, block_size=4)))
    ref = LLM(EngineConfig(model=str(tiny_llama), cache=CacheConfig(num_blocks=64, block_size=4)))
    prompt = list(range(3, 40))
    llm.add_request(prompt, GREEDY, "a")
    sent: list[list[int]] = []
    while llm.has_unfinished():
        planned = llm.schedule_step()
        assert planned is not None
        sent += [s.block_table for s in planned.steps if s.appended]
        llm.process_step(planned, llm.executor.execute(planned.steps))
    assert len(sent) == 39 and all(len(t) <= 1 for t in sent)  # one new block at most
    # The last sampled token is never computed: 76 tokens in 19 blocks, 9 beyond the first 10.
    assert sum(len(t) for t in sent) == 9
    assert llm.runner.block_tables == {}  # forgotten when the request finished
    want = ref.generate([prompt], GREEDY)[0].token_ids
    llm.add_request(prompt, GREEDY, "b")
    got = []
    while llm.has_unfinished():
        got = [o.token_ids for o in llm.step()] or got
    assert got[0] == want


def test_runner_refuses_ids_for_an_unknown_table(tiny_llama: Path) -> None:
    llm = LLM(EngineConfig(model=str(tiny_llama), cache=CacheConfig(num_blocks=8)))
    step = SeqStep("ghost", [1], 3, [2], True, GREEDY, appended=True)
    with pytest.raises(ValueError, match="'ghost', whose table is unknown"):
        llm.runner.build_batch([step])
