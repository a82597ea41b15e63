"""Scheduler: token budget, chunked prefill, preemption by recompute, abort, invariants."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus

BS = 4


def make_seq(rid: str, n: int, first: int = 0) -> Sequence:
    prompt = [first + i for i in range(n)]
    return Sequence(request_id=rid, prompt_token_ids=prompt, params=SamplingParams())


def make_sched(
    num_blocks: int = 64,
    max_tokens: int = 2048,
    max_seqs: int = 64,
    chunked: bool = True,
    prefix_caching: bool = True,
) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens, chunked_prefill=chunked
    )
    return Scheduler(cfg, BlockManager(num_blocks, BS, prefix_caching))


def step(sched: Scheduler, token: int = 1000) -> ScheduledBatch:
    """One fake engine step: schedule, 'run', append a token where one is sampled."""
    batch = sched.schedule()
    sched.on_step_done(batch)
    for i, seq in enumerate(batch.seqs):
        if batch.needs_sample(i):
            seq.append_token(token)
    return batch


def plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_tokens, strict=True)]


def live(sched: Scheduler) -> list[Sequence]:
    return [*sched.running, *sched.waiting]


def test_scheduler_modules_do_not_import_torch() -> None:
    code = "import sys, engine.block_manager, engine.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_add_rejects_duplicates_and_impossible_prompts() -> None:
    sched = make_sched(num_blocks=4)
    sched.add(make_seq("a", 3))
    with pytest.raises(ValueError, match="'a'"):
        sched.add(make_seq("a", 3))
    with pytest.raises(ValueError, match="17 tokens"):
        sched.add(make_seq("big", 17))
    assert sched.num_waiting == 1 and sched.has_unfinished()


def test_batch_validates_and_computes_flags() -> None:
    seq = make_seq("a", 5)
    batch = ScheduledBatch([seq], [5])
    assert batch.needs_sample(0) and batch.total_tokens == 5 and not batch.is_empty
    assert ScheduledBatch([], []).is_empty
    with pytest.raises(ValueError, match="differ"):
        ScheduledBatch([seq], [])


def test_token_budget_is_respected() -> None:
    sched = make_sched(max_tokens=10)
    for rid in "abc":
        sched.add(make_seq(rid, 8))
    batch = step(sched)
    assert plan(batch) == [("a", 8), ("b", 2)]
    assert batch.total_tokens == 10
    assert [batch.needs_sample(i) for i in range(2)] == [True, False]
    assert sched.num_running == 2 and sched.num_waiting == 1
    batch = step(sched)
    # b continues its chunk (6), c gets the rest (3), a decodes one token.
    assert plan(batch) == [("b", 6), ("c", 3), ("a", 1)]
    assert batch.total_tokens == 10


def test_max_num_seqs_is_respected() -> None:
    sched = make_sched(max_seqs=2)
    for rid in "abc":
        sched.add(make_seq(rid, 3))
    assert [s.request_id for s in step(sched).seqs] == ["a", "b"]
    assert [s.request_id for s in step(sched).seqs] == ["a", "b"]
    sched.finish(sched.running[0], FinishReason.STOP)
    assert plan(step(sched)) == [("c", 3), ("b", 1)]


def test_chunked_prefill_splits_long_prompt_and_samples_only_at_the_end() -> None:
    sched = make_sched(max_tokens=10)
    seq = make_seq("a", 25)
    sched.add(seq)
    chunks, flags = [], []
    for _ in range(3):
        batch = step(sched)
        chunks.append(batch.num_tokens[0])
        flags.append(batch.needs_sample(0))
    assert chunks == [10, 10, 5] and flags == [False, False, True]
    assert len(seq) == 26 and seq.num_computed_tokens == 25
    batch = step(sched)
    assert plan(batch) == [("a", 1)] and batch.needs_sample(0)


def test_without_chunking_long_prompt_runs_whole_and_alone() -> None:
    sched = make_sched(max_tokens=10, chunked=False)
    sched.add(make_seq("long", 25))
    sched.add(make_seq("short", 3))
    batch = step(sched)
    assert plan(batch) == [("long", 25)] and batch.needs_sample(0)
    assert plan(step(sched)) == [("short", 3), ("long", 1)]


def test_without_chunking_long_prompt_waits_for_an_empty_batch() -> None:
    sched = make_sched(max_tokens=10, chunked=False)
    short, long_ = make_seq("short", 3), make_seq("long", 25)
    sched.add(short)
    sched.add(long_)
    assert plan(step(sched)) == [("short", 3)]
    assert plan(step(sched)) == [("short", 1)]  # long never splits, so it waits
    sched.finish(short, FinishReason.STOP)
    assert plan(step(sched)) == [("long", 25)]


def test_decodes_are_scheduled_before_new_prefills() -> None:
    sched = make_sched(max_tokens=5)
    sched.add(make_seq("a", 4))
    step(sched)
    sched.add(make_seq("b", 10))
    batch = step(sched)
    # a's decode took its token out of the budget first; b's chunk is listed first.
    assert plan(batch) == [("b", 4), ("a", 1)]


def test_preemption_frees_newest_and_recomputes_all_its_tokens() -> None:
    sched = make_sched(num_blocks=4)
    a, b = make_seq("a", 7), make_seq("b", 7, first=100)
    sched.add(a)
    sched.add(b)
    assert plan(step(sched)) == [("a", 7), ("b", 7)]
    assert plan(step(sched)) == [("a", 1), ("b", 1)]  # 8 tokens each: 2 blocks each
    bm = sched.block_manager
    assert bm.stats().used == 4 and bm.num_free_blocks == 0
    batch = step(sched)  # both need a 3rd block: only by preempting b
    assert plan(batch) == [("a", 1)]
    assert batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and sched.running == [a]
    bm.check_invariants(live(sched))
    sched.add(make_seq("c", 2))
    assert sched.waiting[0] is b  # preempted goes before newer arrivals
    assert len(b) == 9
    while a.num_output_tokens < 4:
        assert plan(step(sched)) == [("a", 1)]  # b does not fit until a finishes
    sched.finish(a, FinishReason.LENGTH)
    batch = step(sched)
    # b recomputes prompt + its 2 generated tokens; its first block hit the cache.
    assert plan(batch)[0] == ("b", 9 - 4)
    assert b.num_cached_tokens == 4 and batch.needs_sample(0)
    bm.check_invariants(live(sched))


def test_running_sequence_preempts_itself_when_alone() -> None:
    sched = make_sched(num_blocks=2)
    a = make_seq("a", 8)
    sched.add(a)
    step(sched)  # 8 tokens fill both blocks; the 9th needs a third
    batch = sched.schedule()
    assert batch.is_empty and batch.preempted == [a]
    assert a.status is SequenceStatus.WAITING and list(sched.waiting) == [a]
    assert a.block_table == [] and a.num_preemptions == 1
    sched.block_manager.check_invariants(live(sched))


@pytest.mark.parametrize(("victim", "where"), [("a", "waiting"), ("b", "running")])
def test_abort_frees_blocks(victim: str, where: str) -> None:
    sched = make_sched(num_blocks=8, max_seqs=1)
    b, a = make_seq("b", 9), make_seq("a", 5)
    sched.add(b)
    sched.add(a)
    step(sched)
    seq = a if victim == "a" else b
    assert seq in getattr(sched, where)
    assert bool(seq.block_table) == (where == "running")
    assert sched.abort(victim) is seq
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.ABORT
    assert seq.block_table == [] and seq not in sched.running and seq not in sched.waiting
    assert sched.abort(victim) is None and sched.abort("nope") is None
    sched.block_manager.check_invariants(live(sched))
    sched.abort("a" if victim == "b" else "b")
    st = sched.block_manager.stats()
    assert st.free + st.cached == st.total and not sched.has_unfinished()


def test_finish_between_schedule_and_step_done_is_skipped() -> None:
    sched = make_sched()
    a = make_seq("a", 5)
    sched.add(a)
    batch = sched.schedule()
    sched.finish(a, FinishReason.ABORT)
    sched.on_step_done(batch)
    assert a.num_computed_tokens == 0
    with pytest.raises(ValueError, match="not in this scheduler"):
        sched.finish(a, FinishReason.STOP)


def _run_random_workload(seed: int, chunked: bool, prefix_caching: bool) -> tuple[int, int]:
    """Drive a fake engine loop; returns (preemptions, prefix-cache hit tokens)."""
    rng = random.Random(seed)
    max_tokens, max_seqs = rng.choice([8, 16, 32]), rng.choice([2, 4, 8])
    sched = make_sched(
        num_blocks=24,
        max_tokens=max_tokens,
        max_seqs=max_seqs,
        chunked=chunked,
        prefix_caching=prefix_caching,
    )
    shared = [rng.randrange(50) for _ in range(16)]
    pending = []
    for i in range(40):
        prompt = shared[: rng.randrange(17)] + [
            rng.randrange(50) for _ in range(rng.randint(1, 30))
        ]
        seq = Sequence(f"r{i}", prompt, SamplingParams())
        pending.append((seq, rng.randint(1, 20)))
    targets = {s.request_id: n for s, n in pending}
    done: list[Sequence] = []
    for _ in range(5000):
        while pending and rng.random() < 0.3:
            sched.add(pending.pop(0)[0])
        if not pending and not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert len(batch.seqs) <= max_seqs
        assert batch.total_tokens <= max_tokens or len(batch.seqs) == 1
        assert len({s.request_id for s in batch.seqs}) == len(batch.seqs)
        sched.on_step_done(batch)
        for i, seq in enumerate(batch.seqs):
            if batch.needs_sample(i):
                seq.append_token(rng.randrange(50))
                if seq.num_output_tokens == targets[seq.request_id]:
                    sched.finish(seq, FinishReason.LENGTH)
                    done.append(seq)
        sched.block_manager.check_invariants(live(sched))
    assert len(done) == 40 and not sched.has_unfinished()
    assert all(s.num_output_tokens == targets[s.request_id] for s in done)
    st = sched.block_manager.stats()
    assert st.free + st.cached == st.total and st.used == 0
    if not prefix_caching:
        assert st.cached == 0
    return sum(s.num_preemptions for s in done), st.prefix_hit_tokens


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("chunked", "prefix_caching"), [(True, True), (False, True), (True, False), (False, False)]
)
def test_random_workload_keeps_invariants(seed: int, chunked: bool, prefix_caching: bool) -> None:
    preemptions, hit_tokens = _run_random_workload(seed, chunked, prefix_caching)
    # Sized to exercise preemption and prefix hits, not only the happy path (with
    # chunking every seed but 2 preempts; without it long prompts run alone and rarely do).
    assert preemptions > 0 or not chunked or seed == 2
    assert (hit_tokens > 0) == prefix_caching
