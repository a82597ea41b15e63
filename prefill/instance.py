"""A prefill instance: computes prompts, returns each first token at once (TTFT), and
keeps the prompt's KV blocks under a lease until a decode instance has pulled them.

It is an ``EngineCore`` with the prefill scheduler: the step loop, validation, stop
checks and detokenization are the colocated engine's. What differs is ``_on_token``:
a request that does not stop at its first token leaves a ``Handoff`` and a lease.
"""

from __future__ import annotations

import time
from typing import Any

from engine.config import EngineConfig
from engine.core import EngineCore, Prompt, RequestOutput
from engine.executor import Executor, RayExecutor
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, TokenLogprobs
from kvtransfer.handoff import Handoff
from kvtransfer.layout import KVLayout
from kvtransfer.lease import LeaseTable
from prefill.scheduler import PrefillScheduler


class PrefillInstance(EngineCore):
    """Prefill-only instance ``instance_id``. Drive it with ``add_request`` and
    ``step``/``step_async``; collect ``take_handoffs()`` after each step. A decode
    instance ``claim``s a handoff's lease before pulling and ``release``s it after (the
    acknowledgement); ``expire_leases`` frees what nobody pulled in time."""

    scheduler: PrefillScheduler

    def __init__(
        self,
        config: EngineConfig,
        executor: Executor | None = None,
        instance_id: str = "prefill-0",
        policy: str = "fcfs",
        lease_s: float = 30.0,
    ):
        super().__init__(config, executor)
        self.instance_id = instance_id
        self.scheduler = PrefillScheduler(config.scheduler, self.block_manager, policy)
        self.leases: LeaseTable[Sequence] = LeaseTable(lease_s)
        p = config.parallel
        self.layout = KVLayout(p.tp, p.pp, p.pp_boundaries, p.stage_size)
        self._handoffs: list[Handoff] = []

    @property
    def workers(self) -> list[Any]:
        """The Ray worker actors, by rank (the KV transfer reads from them)."""
        if not isinstance(self.executor, RayExecutor):
            raise TypeError("a prefill instance that hands off KV needs Ray workers")
        return self.executor.workers

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validates and queues a prompt; ValueError naming the bad value."""
        seq = self.new_request(prompt, params, request_id)
        self.scheduler.add(seq)
        return seq.request_id

    def _on_token(
        self, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float
    ) -> RequestOutput:
        reason = self._append(seq, token, lp, now)
        if reason is not None:  # done at its first token: nothing to hand off
            return self._finish(seq, reason, now)
        req = self.requests.pop(seq.request_id)
        self.scheduler.detach(seq)
        self.free_request_state([seq.request_id])
        deadline = self.leases.grant(seq.request_id, seq, now)
        self._handoffs.append(
            Handoff(
                request_id=seq.request_id,
                prompt_token_ids=seq.prompt_token_ids,
                first_token=token,
                params=seq.params,
                block_ids=tuple(seq.block_table),
                source=self.instance_id,
                layout=self.layout,
                lease_deadline=deadline,
                arrival_time=seq.arrival_time,
                first_token_time=now,
                num_cached_tokens=seq.num_cached_tokens,
                logprobs=list(seq.logprobs),
            )
        )
        return self._output(req)

    def take_handoffs(self) -> list[Handoff]:
        """The handoffs produced since the last call, in order."""
        out, self._handoffs = self._handoffs, []
        return out

    def claim(self, request_id: str, hold_s: float) -> bool:
        """A decode instance starts reading ``request_id``'s blocks: extends the lease
        to at least ``hold_s`` from now. False if the lease is gone or ran out."""
        return self.leases.claim(request_id, time.monotonic(), hold_s)

    def release(self, request_id: str) -> bool:
        """Ends the lease (the decode instance's acknowledgement, or its failure) and
        frees the blocks; False if there was none."""
        seq = self.leases.release(request_id)
        if seq is None:
            return False
        self.block_manager.free(seq)
        return True

    def expire_leases(self, now: float | None = None) -> list[str]:
        """Frees the blocks of every lease past its deadline; their request ids."""
        gone = self.leases.expire(time.monotonic() if now is None else now)
        for _, seq in gone:
            self.block_manager.free(seq)
        return [rid for rid, _ in gone]

    def abort(self, request_id: str) -> bool:
        """Stops a queued or prefilling request, or ends its lease; False if unknown."""
        if self.release(request_id):
            self._handoffs = [h for h in self._handoffs if h.request_id != request_id]
            return True
        return super().abort(request_id)

    def blocks_pending_release(self) -> bool:
        """Leased blocks come back on ack or expiry: a prompt that finds the cache full
        of them waits instead of failing."""
        return len(self.leases) > 0

    def has_work(self) -> bool:
        """Prompts waiting or being computed (leases are not work)."""
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, Any]:
        """``EngineCore.stats`` plus the leases held and expired so far."""
        return {
            **super().stats(),
            "leased": len(self.leases),
            "leases_expired": self.leases.num_expired,
        }

    def live_sequences(self) -> list[Sequence]:
        """Every sequence that holds blocks: running ones and leased ones."""
        return [*self.scheduler.running, *self.leases.items()]
