"""Simulated instances: the loops of ``router/controller.py`` over ``Batcher``s.
``SimInstance`` is what both kinds share; the kinds are in ``prefill_sim.py`` and
``engine_sim.py``:

- ``PrefillSim`` (``prefill/instance.py``): steps while it has prompts; a prompt
  leaves after the step that computes its last token (its first output token, TTFT)
  and its blocks stay under a lease until the decode instance's pull ends (or the
  lease runs out); leases are expired at the top of each loop iteration.
- ``EngineSim`` (``decode/instance.py``, and the colocated ``LLM``): each iteration
  admits pending handoffs in order while ``_room_for`` holds (a sequence slot, and the
  blocks of the prompt plus one plus one spare block per running sequence), pulling
  each one's KV in turn (``transfer_overhead_s + bytes / bandwidth``; a transfer and
  a step never overlap), then runs one continuous-batching step. Requests queued
  locally (colocated, local prefill, or a pull whose lease ran out) are prefilled in
  its steps, chunked or not.

A step lasts ``step_overhead_s + predict_prefill(chunks of > 1 token) +
predict_decode(single-token entries, their context)``: a mixed step costs its prefill
part plus its decode part, each with its own fixed term ``a``, the way the engine's
step statistics split a step (``engine.requests.step_stats``). With
``PoolSpec.step_time_ratios`` the two predictions are multiplied by one ratio drawn
per step from the instance's own seeded generator; with
``PoolSpec.contended_step_time_ratios``, from those while a neighbour (an instance of
the other pool sharing the host) is mid-step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from bench.sim.batcher import Batcher, Step
from bench.sim.config import PoolSpec
from bench.sim.events import EventQueue
from bench.sim.records import InstanceStats


class SimInstance:
    """What both kinds share: the batcher, the loop's busy flag, step times, stats and
    the router's cached view (dropped after each step, as ``Router.observe`` does)."""

    def __init__(
        self,
        instance_id: str,
        spec: PoolSpec,
        queue: EventQueue,
        shortest_first: bool = False,
    ):
        self.instance_id = instance_id
        self.spec = spec
        self.model = spec.latency
        self.queue = queue
        self.batcher = Batcher(
            spec.num_blocks,
            spec.block_size,
            spec.max_num_seqs,
            spec.max_num_batched_tokens,
            spec.chunked_prefill,
            shortest_first,
        )
        self.stats = InstanceStats(instance_id)
        self.busy = False  # a loop iteration is due or running (a step or a pull)
        self._ratios = spec.step_time_ratios
        self.step_end_s = float("-inf")  # when the step in flight ends
        # Instances whose steps slow this one's (the other pool's, on a shared host):
        # while one is mid-step, steps draw from ``spec.contended_step_time_ratios``.
        self.neighbours: Sequence[SimInstance] = ()
        # A str seed hashes the same in every process: runs are reproducible.
        self._rng = random.Random(f"{spec.seed}:{instance_id}")
        self.view: Any = None  # the router's view of this instance, None when stale

    def kick(self, now: float) -> None:
        """Wakes an idle loop (new work or freed blocks); a busy one sees it anyway."""
        if not self.busy:
            self.busy = True
            self.queue.push(now, self._iterate)

    def _iterate(self, now: float, _: Any = None) -> None:
        raise NotImplementedError

    def _start_step(self, now: float) -> bool:
        """Schedules and starts one step; False when nothing could be scheduled."""
        step = self.batcher.schedule()
        for seq in step.preempted:
            seq.rec.num_preemptions += 1
        if not step:
            return False
        for seq, _n in step.entries:
            if seq.rec.prefill_start_s is None:
                seq.rec.prefill_start_s = now
        seconds = self.model.predict_prefill(step.chunks)
        seconds += self.model.predict_decode(step.decodes, step.context)
        ratios = self._ratios
        contended = self.spec.contended_step_time_ratios
        if contended and any(n.step_end_s > now for n in self.neighbours):
            ratios = contended
        if ratios:
            seconds *= ratios[self._rng.randrange(len(ratios))]
        seconds += self.spec.step_overhead_s
        st = self.stats
        st.steps += 1
        st.busy_s += seconds
        st.tokens += step.tokens
        st.preemptions = self.batcher.num_preemptions
        self.step_end_s = now + seconds
        self.queue.push(now + seconds, self._step_done, step)
        return True

    def _step_done(self, now: float, step: Step) -> None:
        raise NotImplementedError
