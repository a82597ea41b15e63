"""Block manager: ref counts, prefix caching, LRU eviction, all-or-nothing allocation."""

from __future__ import annotations

import subprocess
import sys

import pytest

import engine.block_manager as bm_mod
from engine.block_manager import BlockManager, hash_block_tokens
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4


def make_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams())


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """Allocate and 'run' num_tokens more tokens of seq, as the scheduler + engine do."""
    assert bm.allocate_slots(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.commit(seq)


def admit(bm: BlockManager, seq: Sequence) -> int:
    """First allocation with prefix reuse; computes the rest; returns cached tokens."""
    blocks, cached = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, len(seq) - cached, blocks)
    seq.num_computed_tokens = len(seq)
    bm.commit(seq)
    return cached


# --- hash ---------------------------------------------------------------------------


def test_hash_is_deterministic_across_processes_and_chained() -> None:
    here = hash_block_tokens(None, [1, 2, 3, 4])
    code = "from engine.block_manager import hash_block_tokens as h; print(h(None, [1, 2, 3, 4]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == here
    assert 0 <= here < 2**64
    assert hash_block_tokens(here, [5]) != hash_block_tokens(None, [5])
    assert hash_block_tokens(0, [5]) != hash_block_tokens(None, [5])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])


def test_hash_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="parent_hash"):
        hash_block_tokens(-1, [1])
    with pytest.raises(ValueError, match="int64"):
        hash_block_tokens(None, [2**70])


# --- construction and basic allocation ----------------------------------------------


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 16)])
def test_constructor_validates(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match=r"num_blocks|block_size"):
        BlockManager(num_blocks, block_size)


def test_num_blocks_for() -> None:
    bm = BlockManager(4, BS)
    assert [bm.num_blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="-1"):
        bm.num_blocks_for(-1)


def test_allocate_and_free_counts() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq("a", list(range(10)))
    assert bm.allocate_slots(seq, 10, [])
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    bm.check_invariants([seq])
    # Growing by tokens that fit the last block takes nothing new.
    seq.num_computed_tokens = 10
    assert bm.allocate_slots(seq, 2)
    assert len(seq.block_table) == 3
    assert bm.allocate_slots(seq, 3)
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 8
    st = bm.stats()
    assert (st.total, st.free, st.cached, st.used) == (8, 8, 0, 0)
    bm.check_invariants([])


def test_allocate_validates() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq("a", list(range(5)))
    with pytest.raises(ValueError, match="-1"):
        bm.allocate_slots(seq, -1)
    assert bm.allocate_slots(seq, 5, [])
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate_slots(seq, 1, [])
    with pytest.raises(ValueError, match="already holds"):
        bm.get_computed_blocks(seq)
    other = make_seq("b", list(range(5)))
    with pytest.raises(ValueError, match="not a cached block"):
        bm.allocate_slots(other, 1, [seq.block_table[0]])
    with pytest.raises(ValueError, match="block_id"):
        bm.ref_count(8)


def test_allocation_is_all_or_nothing() -> None:
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(12)))
    assert bm.allocate_slots(a, 12, [])
    b = make_seq("b", list(range(100, 108)))
    assert not bm.allocate_slots(b, 8, [])
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.num_free_blocks == 1
    bm.check_invariants([a, b])


def test_revived_cached_blocks_count_against_capacity() -> None:
    bm = BlockManager(4, BS)
    a = make_seq("a", [*range(8), 99])
    admit(bm, a)
    bm.free(a)
    assert bm.stats().cached == 2
    # Reuses 2 cached blocks but needs 3 fresh ones: 5 > 4, so nothing may change.
    b = make_seq("b", list(range(8)) + list(range(50, 62)))
    blocks, cached = bm.get_computed_blocks(b)
    assert cached == 8 and len(blocks) == 2
    before = bm.stats()
    assert not bm.allocate_slots(b, len(b) - cached, blocks)
    assert bm.stats() == before
    assert b.block_table == [] and b.num_computed_tokens == 0
    bm.check_invariants([b])


# --- prefix caching -----------------------------------------------------------------


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(13)))  # 3 full blocks + 1 token
    assert admit(bm, a) == 0
    b = make_seq("b", [*range(8), 70, 71, 72, 73, 74])
    blocks, cached = bm.get_computed_blocks(b)
    assert blocks == a.block_table[:2] and cached == 8
    assert all(bm.ref_count(x) == 1 for x in blocks)  # lookup takes no reference
    assert bm.allocate_slots(b, len(b) - cached, blocks)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1, 1]
    bm.check_invariants([a, b])
    st = bm.stats()
    assert (st.prefix_queries_tokens, st.prefix_hit_tokens) == (26, 8)
    assert st.prefix_hit_rate == pytest.approx(8 / 26)
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table[:2]] == [1, 1]
    assert b.num_cached_tokens == 8
    bm.check_invariants([b])


def test_different_first_block_misses() -> None:
    bm = BlockManager(16, BS)
    admit(bm, make_seq("a", list(range(9))))
    assert bm.get_computed_blocks(make_seq("b", [0, 1, 2, 5, 4, 5, 6, 7, 8])) == ([], 0)


def test_cached_blocks_survive_free_and_are_reused() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    table = list(a.block_table)
    bm.free(a)
    st = bm.stats()
    assert (st.free, st.cached, st.used) == (6, 2, 0)
    b = make_seq("b", list(range(9)))
    assert admit(bm, b) == 8
    assert b.block_table[:2] == table[:2]
    assert bm.stats().cached == 0
    bm.check_invariants([b])


def test_fully_cached_sequence_leaves_last_block_to_compute() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    b = make_seq("b", list(range(8)))
    blocks, cached = bm.get_computed_blocks(b)
    assert blocks == a.block_table[:1] and cached == 4
    assert bm.allocate_slots(b, 4, blocks)
    assert b.block_table[1] != a.block_table[1]  # the shared full block is never written


def test_recompute_hits_generated_tokens_too() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(6)))
    admit(bm, a)
    for t in (100, 101, 102):  # generated tokens complete the second block
        a.append_token(t)
        compute(bm, a, 1)
    assert a.num_computed_tokens == 9
    bm.free(a)  # preempted
    blocks, cached = bm.get_computed_blocks(a)
    assert cached == 8 and len(blocks) == 2


def test_hash_collision_is_caught_by_token_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_mod, "hash_block_tokens", lambda parent, tokens: 42)
    bm = BlockManager(16, BS)
    a = make_seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    # Only the first block got hash 42; the second collides and stays unhashed.
    bm.check_invariants([a])
    assert bm.get_computed_blocks(make_seq("b", [9, 9, 9, 9, 9])) == ([], 0)
    # Same first block: a true hit; second block collides, the tokens differ: a miss.
    blocks, cached = bm.get_computed_blocks(make_seq("c", [1, 2, 3, 4, 9, 9, 9, 9, 9]))
    assert blocks == a.block_table[:1] and cached == 4
    # Same tokens as the first block but at position 1: the parent differs: a miss.
    blocks, _ = bm.get_computed_blocks(make_seq("d", [1, 2, 3, 4, 1, 2, 3, 4, 0]))
    assert blocks == a.block_table[:1]


def test_duplicate_block_stays_unhashed_and_goes_to_free_list() -> None:
    bm = BlockManager(8, BS)
    a, b = make_seq("a", list(range(5))), make_seq("b", list(range(5)))
    for s in (a, b):  # both allocated before either committed: no sharing
        assert bm.allocate_slots(s, 5, bm.get_computed_blocks(s)[0])
    for s in (a, b):
        s.num_computed_tokens = 5
        bm.commit(s)
    bm.check_invariants([a, b])
    bm.free(b)
    assert bm.stats().cached == 0  # b's full block duplicated a's, so it was not hashed
    bm.free(a)
    assert bm.stats().cached == 1
    bm.check_invariants([])


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.free(a)
    assert bm.stats().cached == 0
    assert bm.get_computed_blocks(make_seq("b", list(range(9)))) == ([], 0)
    assert bm.stats().prefix_queries_tokens == 0


# --- LRU eviction --------------------------------------------------------------------


@pytest.mark.parametrize("b_first", [False, True])
def test_lru_evicts_least_recently_freed_tail_first(b_first: bool) -> None:
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(8)))
    b = make_seq("b", list(range(20, 28)))
    for s in (a, b):
        assert bm.allocate_slots(s, 8, [])
        s.num_computed_tokens = 8
        bm.commit(s)
    a_tab, b_tab = list(a.block_table), list(b.block_table)
    for s in (b, a) if b_first else (a, b):
        bm.free(s)
    assert bm.stats().cached == 4 and bm.stats().free == 0
    first, second = (b_tab, a_tab) if b_first else (a_tab, b_tab)
    expected = [first[1], first[0], second[1], second[0]]
    c = make_seq("c", list(range(100, 116)))
    taken = []
    for _ in range(4):  # one fresh block at a time shows the eviction order
        assert bm.allocate_slots(c, BS)
        c.num_computed_tokens += BS
        taken.append(c.block_table[-1])
        bm.check_invariants([c])
    assert taken == expected
    assert bm.stats().cached == 0


def test_eviction_drops_hash_entry_and_free_list_is_used_first() -> None:
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(8)))
    assert bm.allocate_slots(a, 8, [])
    a.num_computed_tokens = 8
    bm.commit(a)
    bm.free(a)  # 2 cached, 2 free
    c = make_seq("c", list(range(50, 58)))
    assert bm.allocate_slots(c, 8, [])
    assert not set(c.block_table) & {0, 1}
    assert bm.stats().cached == 2
    d = make_seq("d", [7])
    assert bm.allocate_slots(d, 1, [])  # evicts a's tail block
    assert bm.get_computed_blocks(make_seq("a2", list(range(9))))[1] == 4
    bm.check_invariants([c, d])


# --- invariants ----------------------------------------------------------------------


def test_check_invariants_catches_corruption() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(9)))
    admit(bm, a)
    bm.check_invariants([a])
    with pytest.raises(RuntimeError, match="live holders"):
        bm.check_invariants([])  # a holds blocks but is not live
    bm._ref[a.block_table[0]] += 1
    with pytest.raises(RuntimeError, match="ref 2"):
        bm.check_invariants([a])
    bm._ref[a.block_table[0]] -= 1
    bm._free.append(a.block_table[2])  # used and free at once
    with pytest.raises(RuntimeError):
        bm.check_invariants()
    bm._free.pop()
    h = next(iter(bm._hash_to_block))
    bm._hash_to_block[h] = a.block_table[2]
    with pytest.raises(RuntimeError, match="hash"):
        bm.check_invariants()


def test_free_twice_is_an_error() -> None:
    bm = BlockManager(4, BS)
    a = make_seq("a", [1, 2])
    assert bm.allocate_slots(a, 2, [])
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(RuntimeError, match="ref 0"):
        bm.free(a)
