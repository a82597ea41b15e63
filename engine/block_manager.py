"""Paged KV block manager with ref counting and hash-based prefix caching (no torch).

Every block is in exactly one state: *free* (ref 0, no hash), *cached* (ref 0, hashed,
evictable, in LRU order) or *used* (ref > 0). Full, fully computed blocks are hashed
with a chained hash so that a later sequence with the same prefix can reuse their K/V.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

from engine.sequence import Sequence

_HASH_BYTES = 8
_MAX_HASH = 1 << (8 * _HASH_BYTES)


def hash_block_tokens(parent_hash: int | None, token_ids: SequenceABC[int]) -> int:
    """Chained hash of one block: blake2b over the parent hash and the tokens as int64.

    Deterministic across processes and machines (unlike ``hash()``), so the router and
    the KV transfer can compute the same values. Returns an unsigned 64-bit int; callers
    must still compare tokens, since 64 bits can collide.
    """
    if parent_hash is not None and not 0 <= parent_hash < _MAX_HASH:
        raise ValueError(f"parent_hash must be an unsigned 64-bit int, got {parent_hash}")
    h = hashlib.blake2b(digest_size=_HASH_BYTES)
    # A tag byte keeps "no parent" distinct from any parent value.
    h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(8, "little"))
    try:
        h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    except struct.error as e:
        raise ValueError(f"token ids must fit in int64: {list(token_ids)!r}") from e
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: SequenceABC[int], block_size: int) -> list[int]:
    """The chained hashes of every full block of ``token_ids`` (computed once, then
    looked up in any number of block managers: ``cached_prefix_tokens``)."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - len(token_ids) % block_size, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class BlockStats:
    """A snapshot of block usage; free + cached + used == total."""

    total: int
    free: int
    cached: int
    used: int
    prefix_queries_tokens: int
    prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hit_tokens / self.prefix_queries_tokens
            if self.prefix_queries_tokens
            else 0.0
        )


class BlockManager:
    """Allocates KV blocks to sequences; reuses hashed full blocks across sequences.

    Contract: a sequence's ``block_table`` always covers at least its
    ``num_computed_tokens``; blocks shared through the prefix cache are full and never
    written again. Single-threaded: callers serialize access.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        # Per-block metadata, set only while the block is registered in _hash_to_block.
        self._hash: list[int | None] = [None] * num_blocks
        self._parent: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # oldest (evicted first) first
        # request_id -> (blocks already considered by commit, hash of the last of them)
        self._commit_pos: dict[str, tuple[int, int | None]] = {}
        self._queries_tokens = 0
        self._hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: truly free plus cached (evictable) ones."""
        return len(self._free) + len(self._cached)

    def ref_count(self, block_id: int) -> int:
        """How many block tables hold ``block_id`` now."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id must be in [0, {self.num_blocks}), got {block_id}")
        return self._ref[block_id]

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """Longest cached prefix of ``seq.token_ids`` as (block ids, num cached tokens).

        Only for a sequence with nothing allocated. Takes no references: pass the
        result straight to ``allocate_slots``. At least one token is always left to
        compute, so a fully cached sequence gives back all but its last block.
        """
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(
                f"request {seq.request_id!r} already holds blocks "
                f"(block_table={seq.block_table}, num_computed_tokens={seq.num_computed_tokens})"
            )
        blocks = self._cached_blocks(seq.token_ids)
        bs = self.block_size
        if blocks and len(blocks) * bs == len(seq):
            blocks.pop()
        return blocks, len(blocks) * bs

    def cached_prefix_tokens(
        self, token_ids: SequenceABC[int], hashes: SequenceABC[int] | None = None
    ) -> int:
        """How many leading tokens of ``token_ids`` a new sequence would find cached now
        (a read-only look, e.g. for a router comparing instances). ``hashes``:
        ``block_hashes(token_ids, block_size)`` when already computed."""
        return len(self._cached_blocks(token_ids, hashes)) * self.block_size

    def _cached_blocks(
        self, token_ids: SequenceABC[int], hashes: SequenceABC[int] | None = None
    ) -> list[int]:
        """The cached full blocks that hold ``token_ids``'s longest prefix, in order."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        blocks: list[int] = []
        parent: int | None = None
        for i, start in enumerate(range(0, len(token_ids) - len(token_ids) % bs, bs)):
            tokens = tuple(token_ids[start : start + bs])
            h = hashes[i] if hashes is not None else hash_block_tokens(parent, tokens)
            bid = self._hash_to_block.get(h)
            # Tokens and parent are compared so that a hash collision is a miss.
            if bid is None or self._tokens[bid] != tokens or self._parent[bid] != parent:
                break
            blocks.append(bid)
            parent = h
        return blocks

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Grow ``seq.block_table`` to cover ``num_computed_tokens + num_new_tokens``.

        ``computed_blocks`` (from ``get_computed_blocks``) marks the first allocation:
        they are referenced and counted as computed (and cached) tokens. All or nothing:
        returns False and changes nothing when capacity is short.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        computed = self._check_computed(seq, computed_blocks)
        num_computed = len(computed) * self.block_size if computed_blocks is not None else None
        base = seq.num_computed_tokens if num_computed is None else num_computed
        have = len(seq.block_table) + len(computed)
        num_fresh = max(0, self.num_blocks_for(base + num_new_tokens) - have)
        # A cached block we are about to reference stops being allocatable.
        revived = sum(1 for b in computed if self._ref[b] == 0)
        if num_fresh + revived > self.num_free_blocks:
            return False
        for bid in computed:
            if self._ref[bid] == 0:
                del self._cached[bid]
            self._ref[bid] += 1
        seq.block_table.extend(computed)
        for _ in range(num_fresh):
            seq.block_table.append(self._take_fresh_block())
        if num_computed is not None:
            seq.num_computed_tokens = seq.num_cached_tokens = num_computed
            if self.enable_prefix_caching:
                self._queries_tokens += len(seq)
                self._hit_tokens += num_computed
        return True

    def commit(self, seq: Sequence) -> None:
        """Register hashes of the blocks that became full and computed since last time.

        Call after advancing ``seq.num_computed_tokens``. When an identical block is
        already registered, that one stays the cache entry and this one stays unhashed.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        if num_full > len(seq.block_table) or seq.num_computed_tokens > len(seq):
            raise ValueError(
                f"request {seq.request_id!r}: num_computed_tokens={seq.num_computed_tokens} "
                f"exceeds its {len(seq)} tokens or {len(seq.block_table)} blocks"
            )
        pos, parent = self._commit_pos.get(seq.request_id, (0, None))
        for i in range(pos, num_full):
            bid = seq.block_table[i]
            known = self._hash[bid]
            if known is not None:  # a reused prefix block, or registered earlier
                parent = known
                continue
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block_tokens(parent, tokens)
            if h not in self._hash_to_block:
                self._hash_to_block[h] = bid
                self._hash[bid], self._parent[bid], self._tokens[bid] = h, parent, tokens
            parent = h
        self._commit_pos[seq.request_id] = (max(pos, num_full), parent)

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks and reset its progress to 0 tokens.

        Blocks are released tail first, so the LRU evicts a sequence's tail before the
        prefix that other requests are more likely to share. The sequence gets a new
        (empty) list, so that a holder of the old one can tell its table was reset.
        """
        for bid in reversed(seq.block_table):
            if self._ref[bid] <= 0:
                raise RuntimeError(f"block {bid} freed by {seq.request_id!r} has ref 0")
            self._ref[bid] -= 1
            if self._ref[bid] == 0:
                if self._hash[bid] is not None:
                    self._cached[bid] = None
                else:
                    self._free.append(bid)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._commit_pos.pop(seq.request_id, None)

    def stats(self) -> BlockStats:
        """Current block counts and prefix-cache hit counters."""
        free, cached = len(self._free), len(self._cached)
        return BlockStats(
            total=self.num_blocks,
            free=free,
            cached=cached,
            used=self.num_blocks - free - cached,
            prefix_queries_tokens=self._queries_tokens,
            prefix_hit_tokens=self._hit_tokens,
        )

    def check_invariants(self, live_seqs: Iterable[Sequence] | None = None) -> None:
        """Raise RuntimeError on the first broken invariant (see the module docstring).

        With ``live_seqs``, also check that every ref count equals the number of live
        block tables holding the block, so no block is held by a gone request.
        """
        free_set, cached_set = set(self._free), set(self._cached)
        used = sum(1 for r in self._ref if r > 0)
        if len(free_set) != len(self._free):
            raise RuntimeError("free list holds a block twice")
        if free_set & cached_set:
            raise RuntimeError(f"blocks both free and cached: {sorted(free_set & cached_set)}")
        if len(free_set) + len(cached_set) + used != self.num_blocks:
            raise RuntimeError(
                f"free {len(free_set)} + cached {len(cached_set)} + used {used} "
                f"!= total {self.num_blocks}"
            )
        for bid in range(self.num_blocks):
            self._check_block(bid, bid in free_set, bid in cached_set)
        for h, bid in self._hash_to_block.items():
            if self._hash[bid] != h:
                raise RuntimeError(
                    f"hash map entry {h} -> block {bid} whose hash is {self._hash[bid]}"
                )
        if live_seqs is not None:
            self._check_refs(live_seqs)

    def _check_block(self, bid: int, is_free: bool, is_cached: bool) -> None:
        ref, h = self._ref[bid], self._hash[bid]
        if ref < 0:
            raise RuntimeError(f"block {bid} has negative ref count {ref}")
        if (ref > 0) == (is_free or is_cached):
            raise RuntimeError(f"block {bid}: ref {ref}, free={is_free}, cached={is_cached}")
        if is_free and h is not None:
            raise RuntimeError(f"free block {bid} still has hash {h}")
        if is_cached and h is None:
            raise RuntimeError(f"cached block {bid} has no hash")
        if h is not None and self._hash_to_block.get(h) != bid:
            raise RuntimeError(f"block {bid} has hash {h} but the map does not point to it")

    def _check_refs(self, live_seqs: Iterable[Sequence]) -> None:
        holders: Counter[int] = Counter()
        for seq in live_seqs:
            if len(set(seq.block_table)) != len(seq.block_table):
                raise RuntimeError(f"request {seq.request_id!r} holds a block twice")
            if len(seq.block_table) * self.block_size < seq.num_computed_tokens:
                raise RuntimeError(f"request {seq.request_id!r}: blocks do not cover its tokens")
            holders.update(seq.block_table)
        for bid in range(self.num_blocks):
            if self._ref[bid] != holders[bid]:
                raise RuntimeError(
                    f"block {bid} has ref {self._ref[bid]} but {holders[bid]} live holders"
                )

    def _check_computed(self, seq: Sequence, computed_blocks: list[int] | None) -> list[int]:
        if computed_blocks is None:
            return []
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(
                f"computed_blocks given for request {seq.request_id!r}, which already holds "
                f"blocks (block_table={seq.block_table})"
            )
        if len(set(computed_blocks)) != len(computed_blocks):
            raise ValueError(f"computed_blocks has duplicates: {computed_blocks}")
        for bid in computed_blocks:
            if not 0 <= bid < self.num_blocks or self._hash[bid] is None:
                raise ValueError(f"computed block {bid} is not a cached block")
        return computed_blocks

    def _take_fresh_block(self) -> int:
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._cached.popitem(last=False)
            h = self._hash[bid]
            if h is not None:
                del self._hash_to_block[h]
            self._hash[bid] = self._parent[bid] = self._tokens[bid] = None
        self._ref[bid] = 1
        return bid
