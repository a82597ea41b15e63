"""A decode instance: admits handoffs when it can allocate their blocks (pull: the
prefill side is the queue), pulls their KV through the KV-transfer service,
acknowledges, and runs continuous batching (``LLM``'s step loop, preemption included).

A handoff whose transfer fails or whose lease is gone is not lost: it is recomputed
here from its prompt and first token (the colocated path), and counted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from decode.llm import LLM
from engine.config import EngineConfig
from engine.core import RequestIdInUse
from engine.executor import Executor, RayExecutor
from engine.sequence import Sequence
from kvtransfer.handoff import Handoff, KVSource
from kvtransfer.layout import KVLayout, KVShape
from kvtransfer.plan import plan_transfer
from kvtransfer.transport import TransferError, Transport


@dataclass(frozen=True)
class TransferRecord:
    """One handoff's transfer as it happened (monotonic seconds; bytes moved)."""

    request_id: str
    source: str
    transport: str
    num_bytes: int
    num_blocks: int
    num_cached_blocks: int  # found in this instance's prefix cache: not moved
    start: float
    end: float
    ok: bool
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def gbps(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class DecodeInstance(LLM):
    """Decode instance ``instance_id``; ``add_handoff`` queues work, ``admit`` pulls
    what fits (await it between steps), ``step_async`` decodes. ``transport`` None: a
    colocated instance that prefills its requests itself (a handoff is recomputed)."""

    def __init__(
        self,
        config: EngineConfig,
        transport: Transport | None,
        executor: Executor | None = None,
        instance_id: str = "decode-0",
        transfer_timeout_s: float = 30.0,
    ):
        super().__init__(config, executor)
        self.instance_id = instance_id
        self.transport = transport
        self.transfer_timeout_s = transfer_timeout_s
        p = config.parallel
        self.layout = KVLayout(p.tp, p.pp, p.pp_boundaries, p.stage_size)
        m, info = self.model_config, self.executor.info
        self.shape = KVShape(m.num_layers, m.num_kv_heads, m.head_dim, info.block_size, info.dtype)
        self.pending: deque[Handoff] = deque()
        self.records: dict[str, TransferRecord] = {}
        self.transferring: dict[str, KVSource] = {}
        self.num_recomputed = 0
        # Transfer metrics over the instance's life (pdserve:kv_transfer_* in the API).
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self.num_transfers = 0
        self.num_transfer_failures = 0

    @property
    def workers(self) -> list[Any]:
        """The Ray worker actors, by rank (the KV transfer writes into them)."""
        if not isinstance(self.executor, RayExecutor):
            raise TypeError("a decode instance that pulls KV needs Ray workers")
        return self.executor.workers

    def add_handoff(self, handoff: Handoff) -> None:
        """Queues a prefilled request; ValueError if its id is already here."""
        rid = handoff.request_id
        if rid in self.requests or any(h.request_id == rid for h in self.pending):
            raise RequestIdInUse(rid)
        self.pending.append(handoff)

    def has_work(self) -> bool:
        return bool(self.pending) or self.scheduler.has_unfinished()

    def _room_for(self, handoff: Handoff) -> bool:
        seqs = self.scheduler.num_running + self.scheduler.num_waiting + len(self.transferring)
        # One spare block per running sequence keeps admission from forcing preemption.
        needed = self.block_manager.num_blocks_for(len(handoff.prompt_token_ids) + 1)
        spare = self.scheduler.num_running
        return (
            seqs < self.config.scheduler.max_num_seqs
            and self.block_manager.num_free_blocks >= needed + spare
        )

    async def admit(self, sources: Mapping[str, KVSource]) -> list[str]:
        """Admits queued handoffs in order while their blocks fit, pulling each one's KV
        (one at a time: a transfer and a step never run on the workers at once). Returns
        the admitted request ids. A handoff that does not fit stays queued (its lease
        on the prefill side keeps its KV)."""
        admitted = []
        while self.pending and self._room_for(self.pending[0]):
            handoff = self.pending.popleft()
            source = sources.get(handoff.source)
            if source is None:
                raise ValueError(f"handoff {handoff.request_id!r} names unknown source")
            if await self._admit_one(handoff, source):
                admitted.append(handoff.request_id)
        return admitted

    async def _admit_one(self, handoff: Handoff, source: KVSource) -> bool:
        rid, prompt = handoff.request_id, handoff.prompt_token_ids
        try:
            seq = self.new_request(prompt, handoff.params, rid)
        except ValueError:
            source.release(rid)
            raise
        seq.arrival_time = handoff.arrival_time
        bm = self.block_manager
        computed, num_cached = bm.get_computed_blocks(seq)
        if not bm.allocate_slots(seq, len(prompt) - num_cached, computed):
            raise RuntimeError(f"no blocks for {rid!r} although admission found room")
        record = await self._pull(handoff, source, seq, num_cached // bm.block_size)
        self._count(record)
        if rid not in self.requests:  # aborted while the transfer ran
            bm.free(seq)
            return False
        self.records[rid] = record
        if record.ok:
            seq.num_computed_tokens = len(prompt)
            bm.commit(seq)
        else:
            bm.free(seq)  # recompute here from the prompt and first token
            self.num_recomputed += 1
        seq.num_cached_tokens = handoff.num_cached_tokens
        self.requests[rid].first_token_time = handoff.first_token_time
        lp = handoff.logprobs[0] if handoff.logprobs else None
        reason = self._append(seq, handoff.first_token, lp, time.monotonic())
        if record.ok:
            self.scheduler.add_running(seq)
        else:
            self.scheduler.add(seq)
        if reason is not None:
            self._finish(seq, reason, time.monotonic())
        return True

    async def _pull(
        self, handoff: Handoff, source: KVSource, seq: Sequence, cached_blocks: int
    ) -> TransferRecord:
        """Claims the lease, moves the uncached blocks, acknowledges; never raises."""
        rid = handoff.request_id
        n = self.block_manager.num_blocks_for(len(handoff.prompt_token_ids))
        src_blocks = handoff.block_ids[cached_blocks:n]
        dst_blocks = seq.block_table[cached_blocks:n]
        start = time.monotonic()
        num_bytes, error = 0, ""
        self.transferring[rid] = source
        try:
            if self.transport is None:
                raise TransferError(f"{self.instance_id} has no KV transport")
            if not source.claim(rid, self.transfer_timeout_s + 5.0):
                raise TransferError(f"the lease on {rid!r} at {handoff.source} is gone")
            moves = plan_transfer(handoff.layout, self.layout, self.shape, src_blocks, dst_blocks)
            stats = await self.transport.transfer(
                rid, moves, self.shape, source.workers, self.workers, self.transfer_timeout_s
            )
            num_bytes = stats.num_bytes
        except (TransferError, TimeoutError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            self.transferring.pop(rid, None)
            source.release(rid)  # the acknowledgement (or giving up): the source frees
        return TransferRecord(
            rid,
            handoff.source,
            self.transport.name if self.transport is not None else "none",
            num_bytes,
            len(src_blocks),
            cached_blocks,
            start,
            time.monotonic(),
            ok=not error,
            error=error,
        )

    def _count(self, record: TransferRecord) -> None:
        self.num_transfers += 1
        self.transfer_bytes += record.num_bytes
        self.transfer_seconds += record.seconds
        self.num_transfer_failures += not record.ok

    def transfer_metrics(self) -> dict[str, float]:
        """Transfers so far: count, failures, bytes, seconds and mean GB/s."""
        secs = self.transfer_seconds
        return {
            "kv_transfers": self.num_transfers,
            "kv_transfer_failures": self.num_transfer_failures,
            "kv_transfer_bytes": self.transfer_bytes,
            "kv_transfer_seconds": secs,
            "kv_transfer_gbps": self.transfer_bytes / secs / 1e9 if secs > 0 else 0.0,
        }

    def abort(self, request_id: str) -> bool:
        """Stops a request queued for admission, being pulled or decoding; a queued
        handoff's lease is left to its source (the controller aborts both sides)."""
        for h in self.pending:
            if h.request_id == request_id:
                self.pending.remove(h)
                return True
        return super().abort(request_id)

    def stats(self) -> dict[str, Any]:
        """``EngineCore.stats`` plus handoffs waiting for room, recomputed handoffs and
        the transfer metrics."""
        return {
            **super().stats(),
            "pending": len(self.pending),
            "recomputed": self.num_recomputed,
            **self.transfer_metrics(),
        }

    def live_sequences(self) -> list[Sequence]:
        """Every sequence that holds blocks here."""
        return [*self.scheduler.running, *self.scheduler.waiting]
