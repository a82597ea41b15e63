"""A simulated decode instance (``decode/instance.py`` in ``Controller._decode_loop``)
or colocated one (``decode/llm.py``'s ``LLM``): each loop iteration admits pending
handoffs in order while ``_room_for`` holds, pulling each one's KV in turn (a transfer
and a step never overlap), then runs one continuous-batching step."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from bench.sim.batcher import SimSeq, Step
from bench.sim.config import PoolSpec
from bench.sim.events import EventQueue
from bench.sim.instances import SimInstance
from bench.sim.prefill_sim import PrefillSim


class EngineSim(SimInstance):
    """A decode instance (pulls handoffs) or a colocated one (``add`` only)."""

    def __init__(
        self,
        instance_id: str,
        spec: PoolSpec,
        queue: EventQueue,
        kv_bytes_per_token: float,
        transfer_time: Callable[[str, str, float], float],
    ):
        super().__init__(instance_id, spec, queue)
        self.kv_bytes_per_token = kv_bytes_per_token
        self.transfer_time = transfer_time  # (prefill id, decode id, bytes) -> seconds
        self.pending: deque[tuple[SimSeq, PrefillSim]] = deque()
        self.transferring: SimSeq | None = None
        self.routed = [0, 0]  # routed here, still prefilling elsewhere: requests, tokens

    def add(self, seq: SimSeq, now: float) -> None:
        """Queues a request prefilled here (colocated or local prefill)."""
        self.batcher.add(seq)
        self.kick(now)

    def add_handoff(self, seq: SimSeq, source: PrefillSim, now: float) -> None:
        """Queues a prefilled request (holding its first token) for admission."""
        self.pending.append((seq, source))
        self.kick(now)

    def room_for(self, seq: SimSeq) -> bool:
        """``DecodeInstance._room_for``."""
        b = self.batcher
        seqs = len(b.running) + len(b.waiting) + (self.transferring is not None)
        need = b.blocks_for(seq.prompt_len + 1) + len(b.running)
        return seqs < b.max_num_seqs and b.free_blocks >= need

    def _iterate(self, now: float, _: Any = None) -> None:
        while self.pending and self.room_for(self.pending[0][0]):
            seq, source = self.pending.popleft()
            if self._pull(seq, source, now):
                return  # the loop goes on when the transfer ends
        if self.batcher.has_unfinished():
            if not self._start_step(now):
                raise RuntimeError(f"{self.instance_id}: no request fits the KV cache")
            return
        self.busy = False

    def _pull(self, seq: SimSeq, source: PrefillSim, now: float) -> bool:
        """Starts ``seq``'s transfer (True), or queues it for recompute when its lease
        is gone (False)."""
        b = self.batcher
        b.allocate(seq, seq.prompt_len)
        rec = seq.rec
        rec.transfer_start_s = now
        if not source.lease_live(seq.rid, now):
            rec.transfer_end_s = now
            rec.recomputed = True
            source.release(seq.rid, now)
            b.free(seq)
            b.add(seq)
            return False
        nbytes = b.blocks_for(seq.prompt_len) * b.block_size * self.kv_bytes_per_token
        seconds = self.transfer_time(source.instance_id, self.instance_id, nbytes)
        st = self.stats
        st.transfers += 1
        st.transfer_bytes += nbytes
        st.transfer_s += seconds
        self.transferring = seq
        self.queue.push(now + seconds, self._pulled, source)
        return True

    def _pulled(self, now: float, source: PrefillSim) -> None:
        seq = self.transferring
        assert seq is not None
        self.transferring = None
        source.release(seq.rid, now)
        seq.rec.transfer_end_s = now
        seq.computed = seq.prompt_len
        self.batcher.running.append(seq)
        self._iterate(now)

    def _step_done(self, now: float, step: Step) -> None:
        # Batcher.complete inlined (the hot loop); the order does not matter here.
        self.view = None
        for seq in step.decoding:  # each computes its last token: it samples
            c = seq.length
            seq.computed = c
            seq.length = c + 1
            out = seq.num_out = seq.num_out + 1
            seq.times.append(now)
            if out >= seq.output_len or out == 1:
                self._first_or_last(seq, now)
        for seq, n in step.entries:
            c = seq.computed + n
            seq.computed = c
            if c != seq.length:
                continue  # a prompt chunk that is not the last: nothing to sample
            seq.length = c + 1
            out = seq.num_out = seq.num_out + 1
            seq.times.append(now)
            if out >= seq.output_len or out == 1:
                self._first_or_last(seq, now)
        self._iterate(now)

    def _first_or_last(self, seq: SimSeq, now: float) -> None:
        if seq.num_out == 1:
            seq.rec.first_token_s = now
        if seq.num_out >= seq.output_len:
            b = self.batcher
            b.running.remove(seq)
            b.free(seq)
            seq.rec.finish_s = now
