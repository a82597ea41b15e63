"""The prefill scheduler: batches waiting prompts under the token budget (FCFS or
shortest first), chunks prompts longer than the budget, reuses cached prefixes, and
lets a prompt go once its first token is sampled (``detach``) while its blocks stay
allocated for the KV transfer. Plain Python (no torch)."""

from __future__ import annotations

import bisect

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

PREFILL_POLICIES = ("fcfs", "shortest_first")


class PrefillScheduler(Scheduler):
    """``Scheduler`` whose sequences never decode: each one leaves with ``detach``
    after the step that computed its last prompt token. ``policy`` orders the waiting
    queue: ``fcfs`` (default) or ``shortest_first`` (fewest prompt tokens first; ties
    in arrival order), which cuts mean TTFT under load at the risk of delaying long
    prompts. Preempted sequences go back to the front either way."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: str = "fcfs"):
        if policy not in PREFILL_POLICIES:
            raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {policy!r}")
        super().__init__(config, block_manager)
        self.policy = policy

    def add(self, seq: Sequence) -> None:
        """Queues ``seq`` by the policy (same checks as ``Scheduler.add``)."""
        super().add(seq)
        if self.policy == "shortest_first":
            self.waiting.pop()
            keys = [len(s) for s in self.waiting]
            # bisect_right keeps arrival order among equal lengths.
            self.waiting.insert(bisect.bisect_right(keys, len(seq)), seq)

    def detach(self, seq: Sequence) -> None:
        """Lets a prefilled ``seq`` go without freeing its blocks: from now on a lease
        owns them and frees them with ``block_manager.free(seq)``."""
        if self._requests.get(seq.request_id) is not seq or seq not in self.running:
            raise ValueError(f"request {seq.request_id!r} is not running in this scheduler")
        del self._requests[seq.request_id]
        self.running.remove(seq)
        seq.status = SequenceStatus.LEASED
