"""The prefill scheduler: FCFS or shortest first, chunking, detach keeps the blocks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus
from prefill.scheduler import PrefillScheduler


def seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams())


def make(policy: str = "fcfs", budget: int = 64, blocks: int = 32) -> PrefillScheduler:
    return PrefillScheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget),
        BlockManager(blocks, 16),
        policy,
    )


def test_fcfs_keeps_arrival_order() -> None:
    s = make()
    for rid, n in [("a", 30), ("b", 5), ("c", 20)]:
        s.add(seq(rid, n))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["a", "b", "c"]
    assert batch.num_tokens == [30, 5, 20]


def test_shortest_first_orders_by_length_stable() -> None:
    s = make("shortest_first", budget=26)
    for rid, n in [("a", 30), ("b", 5), ("c", 20), ("d", 5)]:
        s.add(seq(rid, n))
    assert [q.request_id for q in s.waiting] == ["b", "d", "c", "a"]
    batch = s.schedule()
    # 5 + 5 + 16 of 20 (chunked at the budget)
    assert [q.request_id for q in batch.seqs] == ["b", "d", "c"]
    assert batch.num_tokens == [5, 5, 16]


def test_long_prompt_is_chunked_and_sampled_at_its_end() -> None:
    s = make(budget=16)
    q = seq("a", 40)
    s.add(q)
    flags = []
    for _ in range(3):
        batch = s.schedule()
        flags.append(batch.needs_sample(0))
        s.on_step_done(batch)
    assert flags == [False, False, True]
    assert q.num_computed_tokens == 40


def test_detach_keeps_blocks_until_freed() -> None:
    s = make()
    q = seq("a", 40)
    s.add(q)
    s.on_step_done(s.schedule())
    s.detach(q)
    assert q.status is SequenceStatus.LEASED
    assert not s.has_unfinished()
    bm = s.block_manager
    assert len(q.block_table) == 3 and bm.stats().used == 3
    bm.check_invariants([q])
    bm.free(q)
    bm.check_invariants([])
    with pytest.raises(ValueError, match="'a' is not running"):
        s.detach(q)


def test_bad_policy() -> None:
    with pytest.raises(ValueError, match="got 'lifo'"):
        make("lifo")


def test_no_torch_import() -> None:
    code = "import sys, prefill.scheduler, kvtransfer.lease; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
