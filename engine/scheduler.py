"""Continuous-batching scheduler (colocated and decode instances; the prefill scheduler
extends it): token budget, chunked prefill, preemption by recompute.

Plain Python (no torch). Each ``schedule()`` builds one step: running sequences first
(oldest first, decodes and unfinished prefill chunks), then waiting ones in FCFS order.
When KV blocks run out the newest running sequence is preempted: its blocks are freed
and it is recomputed later from all its tokens (prompt + output so far).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``num_tokens[i]`` new tokens (the query length) of ``seqs[i]``.

    Entries with ``num_tokens > 1`` (prefill chunks) come first, single-token entries
    last; the model runner sends the former through prefill attention and the latter
    through decode attention. ``sample_flags`` is computed at construction (schedule
    time, before progress advances) unless given.
    """

    seqs: list[Sequence]
    num_tokens: list[int]
    preempted: list[Sequence] = field(default_factory=list)
    sample_flags: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.seqs) != len(self.num_tokens):
            raise ValueError(
                f"seqs and num_tokens differ in length: {len(self.seqs)} != {len(self.num_tokens)}"
            )
        if not self.sample_flags:
            self.sample_flags = [
                s.num_computed_tokens + n == len(s)
                for s, n in zip(self.seqs, self.num_tokens, strict=True)
            ]
        elif len(self.sample_flags) != len(self.seqs):
            raise ValueError(
                f"sample_flags has {len(self.sample_flags)} entries, not {len(self.seqs)}"
            )

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def needs_sample(self, i: int) -> bool:
        """True when this step computes the last of ``seqs[i]``'s tokens, so its logits
        give the next token (a non-final prefill chunk gives nothing to sample)."""
        return self.sample_flags[i]


class Scheduler:
    """Decides which sequences run each step and how many tokens each computes.

    Owns the ``waiting`` (FCFS, deque) and ``running`` (oldest first, list) queues and
    all block allocation for them. It never samples nor checks stop conditions: the
    engine appends sampled tokens and calls ``finish``.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._requests: dict[str, Sequence] = {}
        self.num_preemptions = 0  # total over the scheduler's life (a metric)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` (FCFS). ValueError on a duplicate request id, and on a prompt
        that could never fit the whole KV cache (it would block the queue forever)."""
        if seq.request_id in self._requests:
            raise ValueError(f"duplicate request_id {seq.request_id!r}")
        needed = self.block_manager.num_blocks_for(len(seq))
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request {seq.request_id!r}: {len(seq)} tokens need {needed} blocks, "
                f"more than the cache's {self.block_manager.num_blocks}"
            )
        seq.status = SequenceStatus.WAITING
        self._requests[seq.request_id] = seq
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admits ``seq`` straight into the running queue: its prompt's KV is already in
        the blocks the caller allocated (a KV handoff), so it decodes from the next step."""
        if seq.request_id in self._requests:
            raise ValueError(f"duplicate request_id {seq.request_id!r}")
        if seq.num_computed_tokens > len(seq.block_table) * self.block_manager.block_size:
            raise ValueError(
                f"request {seq.request_id!r}: {seq.num_computed_tokens} computed tokens do "
                f"not fit its {len(seq.block_table)} blocks"
            )
        seq.status = SequenceStatus.RUNNING
        self._requests[seq.request_id] = seq
        self.running.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a waiting or running request and free its blocks; None if unknown."""
        seq = self._requests.get(request_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark ``seq`` finished with ``reason``, drop it from its queue, free its blocks."""
        if self._requests.get(seq.request_id) is not seq:
            raise ValueError(f"request {seq.request_id!r} is not in this scheduler")
        del self._requests[seq.request_id]
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> ScheduledBatch:
        """Build the next step within ``max_num_batched_tokens`` and ``max_num_seqs``.

        Waiting sequences are admitted only if nothing was preempted in this call, and
        admission stops at the first one that does not fit (no overtaking).
        """
        budget = self.config.max_num_batched_tokens
        entries: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        budget = self._schedule_running(budget, entries, preempted)
        if not preempted:
            self._schedule_waiting(budget, entries)
        # Stable sort: prefill chunks (q_len > 1) first, single-token entries last.
        entries.sort(key=lambda e: e[1] == 1)
        return ScheduledBatch(
            seqs=[s for s, _ in entries], num_tokens=[n for _, n in entries], preempted=preempted
        )

    def on_step_done(self, batch: ScheduledBatch) -> None:
        """Advance each still-running entry by its scheduled tokens and hash full blocks.

        Entries finished or aborted since ``schedule()`` are skipped.
        """
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)

    def _schedule_running(
        self, budget: int, entries: list[tuple[Sequence, int]], preempted: list[Sequence]
    ) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = seq.num_uncomputed_tokens
            if self.config.chunked_prefill:
                n = min(n, budget)
            elif n > budget and entries:
                break
            if n <= 0:  # waiting for the engine to append a sampled token
                i += 1
                continue
            if not self._allocate_or_preempt(seq, n, preempted):
                break  # seq preempted itself, so it was the last running one
            entries.append((seq, n))
            budget -= n
            i += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Allocate ``n`` slots for running ``seq``, preempting the newest running
        sequences until it fits; False if ``seq`` itself had to go."""
        while not self.block_manager.allocate_slots(seq, n):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, budget: int, entries: list[tuple[Sequence, int]]) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            computed, num_cached = bm.get_computed_blocks(seq)
            n = len(seq) - num_cached
            if self.config.chunked_prefill:
                n = min(n, budget)
            elif n > budget and entries:
                break  # without chunking a prompt over the budget runs only alone
            if not bm.allocate_slots(seq, n, computed):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entries.append((seq, n))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        # Recompute rather than swap: the blocks go back (hashed ones stay cached, so the
        # recompute often hits the prefix cache) and the request rejoins at the front.
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
