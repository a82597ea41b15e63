"""A simulated prefill instance (``prefill/instance.py`` in ``Controller._prefill_loop``):
it steps while it has prompts; a prompt leaves after the step that computes its last
token (its first output token: TTFT) and its blocks stay under a lease until the decode
instance's pull ends, or the lease runs out (leases are expired at the top of each
loop iteration, and an idle loop wakes at the next deadline)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from bench.sim.batcher import SimSeq, Step
from bench.sim.config import PoolSpec
from bench.sim.events import EventQueue
from bench.sim.instances import SimInstance

HandoffFn = Callable[[SimSeq, "PrefillSim", float], None]


class PrefillSim(SimInstance):
    """A prefill instance; ``on_handoff(seq, self, now)`` delivers each prefilled
    request that has more tokens to come (``on_first_only(seq, now)`` the others)."""

    def __init__(
        self,
        instance_id: str,
        spec: PoolSpec,
        queue: EventQueue,
        lease_s: float,
        shortest_first: bool,
        on_handoff: HandoffFn,
        on_first_only: Callable[[SimSeq, float], None],
    ):
        super().__init__(instance_id, spec, queue, shortest_first)
        self.lease_s = lease_s
        self.on_handoff = on_handoff
        self.on_first_only = on_first_only
        # rid -> [deadline, blocks, claimed], in grant order (so by deadline)
        self.leases: OrderedDict[int, list[Any]] = OrderedDict()
        self._wake_at: float | None = None

    def add(self, seq: SimSeq, now: float) -> None:
        """Queues a routed prompt and wakes the loop."""
        self.batcher.add(seq)
        self.kick(now)

    def lease_live(self, rid: int, now: float) -> bool:
        """Claims ``rid``'s lease for a pull; False when it is gone or ran out."""
        lease = self.leases.get(rid)
        if lease is None or lease[0] <= now:
            return False
        lease[2] = True
        return True

    def release(self, rid: int, now: float) -> None:
        """The decode side's acknowledgement (or failure): the blocks come back."""
        lease = self.leases.pop(rid, None)
        if lease is not None:
            self.batcher.free_blocks += lease[1]
            if self.batcher.has_unfinished():
                self.kick(now)

    def _expire(self, now: float) -> float | None:
        """Frees every unclaimed lease past its deadline; the next deadline (leases are
        in deadline order: a claimed one is released when its pull ends)."""
        gone, nxt = [], None
        for rid, (deadline, _, claimed) in self.leases.items():
            if deadline > now:
                if not claimed:
                    nxt = deadline
                    break
            elif not claimed:
                gone.append(rid)
        for rid in gone:
            self.batcher.free_blocks += self.leases.pop(rid)[1]
            self.stats.leases_expired += 1
        return nxt

    def _iterate(self, now: float, _: Any = None) -> None:
        nxt = self._expire(now) if self.leases else None
        if self.batcher.has_unfinished() and self._start_step(now):
            return
        if self.batcher.has_unfinished():
            self.stats.kv_stalls += 1  # every block is leased (the real loop raises here)
        self.busy = False
        if nxt is not None and (self._wake_at is None or nxt < self._wake_at):
            self._wake_at = nxt
            self.queue.push(nxt, self._wake)

    def _wake(self, now: float, _: Any = None) -> None:
        self._wake_at = None
        self.kick(now)

    def _step_done(self, now: float, step: Step) -> None:
        self.view = None
        for seq in self.batcher.complete(step):  # handoffs leave in the real order
            self._first_token(seq, now)
        self._iterate(now)

    def _first_token(self, seq: SimSeq, now: float) -> None:
        rec = seq.rec
        rec.first_token_s = now
        rec.token_times.append(now)
        self.batcher.remove_running(seq)
        if seq.output_len <= 1:  # done at its first token: nothing to hand off
            self.batcher.free(seq)
            rec.finish_s = now
            self.on_first_only(seq, now)
            return
        self.leases[seq.rid] = [now + self.lease_s, seq.blocks, False]
        seq.blocks = 0
        self.on_handoff(seq, self, now)
