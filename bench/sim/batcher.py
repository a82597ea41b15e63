"""The continuous-batching scheduler of ``engine/scheduler.py`` over block counts.

``Batcher.schedule`` makes the same decisions as ``engine.scheduler.Scheduler``:
running sequences first (oldest first), then waiting ones in queue order under
``max_num_batched_tokens`` and ``max_num_seqs``; chunked prefill or, without it, a
prompt over the budget only alone; when blocks run out the newest running sequence is
preempted (recompute: its blocks are freed and it rejoins the waiting queue at the
front); waiting sequences are admitted only when nothing was preempted, and admission
stops at the first that does not fit. The KV cache is a count of free blocks (no
prefix caching: a recomputed sequence recomputes every token). ``shortest_first``
orders the waiting queue as ``prefill.scheduler.PrefillScheduler`` does.
"""

from __future__ import annotations

import bisect
from collections import deque

from bench.sim.records import SimRequest


class SimSeq:
    """One request inside one simulated instance: ``length`` tokens (prompt + output
    so far), ``computed`` of them in the KV cache, ``blocks`` blocks held; ``rec`` is
    the request's record."""

    __slots__ = (
        "blocks",
        "computed",
        "length",
        "num_out",
        "output_len",
        "prompt_len",
        "rec",
        "rid",
        "times",
    )

    def __init__(self, rec: SimRequest, num_out: int = 0):
        self.rec = rec
        self.rid = rec.index
        self.times = rec.token_times  # every output token's time
        prompt_len, output_len = rec.prompt_len, rec.output_len
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.num_out = num_out  # output tokens sampled so far (they are in ``length``)
        self.length = prompt_len + num_out
        self.computed = 0
        self.blocks = 0


Entry = tuple[SimSeq, int]  # (sequence, tokens computed this step)


class Step:
    """One scheduled step: ``decoding`` (running sequences computing their one new
    token, which they sample), the other ``entries`` (prompt chunks, whole prompts,
    recomputes), the sequences ``preempted`` to make room, and the latency model's
    features: the ``chunks`` of more than one token, and the single-token entries
    (``decodes``, a one-token chunk included) with the ``context`` tokens they attend
    to (position + 1 each), as ``engine.requests.step_stats`` counts them."""

    __slots__ = ("chunks", "context", "decodes", "decoding", "entries", "preempted", "tokens")

    def __init__(self) -> None:
        self.decoding: list[SimSeq] = []
        self.entries: list[Entry] = []
        self.preempted: list[SimSeq] = []
        self.chunks: list[int] = []
        self.decodes = 0
        self.context = 0
        self.tokens = 0

    def __bool__(self) -> bool:
        return bool(self.decoding or self.entries)

    def in_batch_order(self) -> list[Entry]:
        """Every entry in ``ScheduledBatch`` order: chunks of more than one token
        first, then single-token entries, each in schedule order (running, then
        waiting); the order in which their tokens are sampled."""
        single = [(s, 1) for s in self.decoding] + [e for e in self.entries if e[1] == 1]
        return [e for e in self.entries if e[1] > 1] + single

    def add(self, seq: SimSeq, n: int) -> None:
        """Appends an entry of ``n`` tokens and its features."""
        self.entries.append((seq, n))
        self.tokens += n
        if n > 1:
            self.chunks.append(n)
        else:
            self.decodes += 1
            self.context += seq.computed + 1


class Batcher:
    """Waiting (deque) and running (list, oldest first) queues and the block count of
    one instance; see the module docstring for the rules."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunked_prefill: bool,
        shortest_first: bool = False,
    ):
        self.num_blocks = num_blocks
        self.free_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.chunked = chunked_prefill
        self.shortest_first = shortest_first
        self.waiting: deque[SimSeq] = deque()
        self.running: list[SimSeq] = []
        self.num_preemptions = 0

    def has_unfinished(self) -> bool:
        """Whether any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def add(self, seq: SimSeq) -> None:
        """Queues ``seq`` (FCFS, or by length with ``shortest_first``)."""
        if self.shortest_first:
            keys = [s.length for s in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, seq.length), seq)
        else:
            self.waiting.append(seq)

    def allocate(self, seq: SimSeq, n: int) -> bool:
        """Grows ``seq``'s blocks to cover ``computed + n`` tokens; all or nothing."""
        need = -(-(seq.computed + n) // self.block_size) - seq.blocks
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        seq.blocks += need
        return True

    def free(self, seq: SimSeq) -> None:
        """Returns all of ``seq``'s blocks and resets its progress."""
        self.free_blocks += seq.blocks
        seq.blocks = 0
        seq.computed = 0

    def remove_running(self, seq: SimSeq) -> None:
        """Drops a running ``seq`` from the queue (finished or leaving); blocks stay."""
        self.running.remove(seq)

    def schedule(self) -> Step:
        """One step's entries and the sequences preempted to make room."""
        step = Step()
        budget = self._schedule_running(step)
        if not step.preempted:
            self._schedule_waiting(budget, step)
        return step

    def complete(self, step: Step) -> list[SimSeq]:
        """Ends ``step``: advances every entry by its tokens and appends a sampled
        token to each that computed its last one; those, in batch order (the order
        the real engine samples them in). The caller finishes or hands them off."""
        sampled = []
        for seq, n in step.in_batch_order():
            seq.computed += n
            if seq.computed == seq.length:
                seq.length += 1
                seq.num_out += 1
                sampled.append(seq)
        return sampled

    def _schedule_running(self, step: Step) -> int:
        running, chunked, bs = self.running, self.chunked, self.block_size
        decoding, preempted = step.decoding, step.preempted
        budget, context = self.budget, 0
        # Iterating the live list is safe: preemption only pops from its end.
        for seq in running:
            if budget <= 0:
                break
            computed = seq.computed
            n = seq.length - computed
            if n == 1:  # a decode (the common case, inline)
                if computed >= seq.blocks * bs:
                    if self.free_blocks > 0:
                        self.free_blocks -= 1
                        seq.blocks += 1
                    elif not self._allocate_or_preempt(seq, 1, preempted):
                        break
                decoding.append(seq)
                budget -= 1
                context += computed
                continue
            if chunked:
                if n > budget:
                    n = budget
            elif n > budget and step:
                break
            if n <= 0:
                continue
            if not self._allocate_or_preempt(seq, n, preempted):
                break
            step.add(seq, n)
            budget -= n
        k = len(decoding)
        step.decodes += k
        step.context += context + k
        step.tokens += k
        return budget

    def _allocate_or_preempt(self, seq: SimSeq, n: int, preempted: list[SimSeq]) -> bool:
        while not self.allocate(seq, n):
            victim = self.running.pop()
            self.free(victim)
            self.num_preemptions += 1
            self.waiting.appendleft(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, budget: int, step: Step) -> None:
        waiting, running = self.waiting, self.running
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            n = seq.length
            if self.chunked:
                n = min(n, budget)
            elif n > budget and step:
                break
            if not self.allocate(seq, n):
                break
            waiting.popleft()
            running.append(seq)
            step.add(seq, n)
            budget -= n
