"""What every instance shares, whatever its role: the model's executor, the KV block
manager, request validation, and the step loop (schedule → execute → process tokens →
stop checks → detokenize).

``decode.llm.LLM`` (colocated instance), ``decode.instance.DecodeInstance`` and
``prefill.instance.PrefillInstance`` differ only in their scheduler and in what happens
to a request once it has a token (``_on_token``). The step is split in three so that an
asyncio controller can run ``schedule_step`` and ``process_step`` on its event loop and
await only the forward (``step_async``): the scheduler is then touched by one thread.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.executor import Executor, SupportsShutdown, execute_async, make_executor
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, SeqStep
from engine.requests import (
    BlockTableDiffs,
    PlannedStep,
    Request,
    RequestIdInUse,
    RequestOutput,
    StepStats,
    step_stats,
)
from engine.sampler import SamplerOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprobs
from engine.stopping import check_stop
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["EngineCore", "Prompt", "RequestIdInUse", "RequestOutput", "StepStats"]

Prompt = str | list[int]


class EngineCore:
    """One instance: executor, block manager, requests and the step loop. Subclasses set
    ``self.scheduler`` and may override ``_on_token``."""

    scheduler: Scheduler

    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        # A checkpoint without tokenizer.json still serves token-id prompts.
        has_tokenizer = (Path(config.model) / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_pretrained(config.model) if has_tokenizer else None
        self.executor = (
            executor if executor is not None else make_executor(config, self.model_config)
        )
        info = self.executor.info
        # A sequence can never hold more blocks than the pool has: stop it there (LENGTH).
        self.max_model_len = min(info.max_model_len, info.num_blocks * info.block_size)
        tok_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else ()
        self.eos_token_ids = set(tok_eos or self.model_config.eos_token_ids)
        self.block_manager = BlockManager(
            info.num_blocks, info.block_size, config.cache.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.last_step: StepStats | None = None  # the latest forward, for latency models
        self.stalled = False  # the last schedule found work but no blocks for it
        self._tables = BlockTableDiffs()

    @property
    def runner(self) -> ModelRunner:
        """The in-process model runner (tp = 1); TypeError when ranks run elsewhere."""
        if not isinstance(self.executor, ModelRunner):
            raise TypeError(f"this instance runs on {type(self.executor).__name__}, not in-process")
        return self.executor

    def shutdown(self) -> None:
        """Releases the executor's workers (a no-op for the in-process runner)."""
        if isinstance(self.executor, SupportsShutdown):
            self.executor.shutdown()

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt``; ValueError (naming the bad value) for an empty prompt,
        ids outside the vocabulary, or a prompt that leaves no room to generate."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer.json: pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                "(at least one token must be left to generate)"
            )
        needed = self.block_manager.num_blocks_for(len(ids) + 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt of {len(ids)} tokens needs {needed} KV blocks; the cache has "
                f"{self.block_manager.num_blocks}"
            )
        return ids

    def new_request(
        self, prompt: Prompt, params: SamplingParams | None, request_id: str | None
    ) -> Sequence:
        """Validates a request and registers it (not yet scheduled); ValueError naming
        the bad value, without touching any other request."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestIdInUse(rid)
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has no tokenizer.json")
        seq = Sequence(rid, ids, params)
        detok = (
            IncrementalDetokenizer(self.tokenizer, ids, stop=params.stop)
            if self.tokenizer is not None
            else None
        )
        self.requests[rid] = Request(seq, detok)
        return seq

    def abort(self, request_id: str) -> bool:
        """Stops a request in any phase and frees its blocks; False if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if not req.seq.is_finished:
            self.scheduler.abort(request_id)
        self.free_request_state([request_id])
        return True

    def free_request_state(self, request_ids: list[str]) -> None:
        """Forgets finished requests on every rank (sampler state, block tables)."""
        self._tables.forget(request_ids)
        self.executor.free(request_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def blocks_pending_release(self) -> bool:
        """Whether blocks held outside the scheduler will come back on their own (a
        prefill instance's leases): then a request that fits nowhere now waits."""
        return False

    def stats(self) -> dict[str, Any]:
        """Load now: queued and running requests, KV blocks (cached ones count as
        free: they are evictable), preemptions so far."""
        b = self.block_manager.stats()
        return {
            "waiting": self.scheduler.num_waiting,
            "running": self.scheduler.num_running,
            "preemptions": self.scheduler.num_preemptions,
            "blocks_total": b.total,
            "blocks_free": b.free + b.cached,
            "blocks_used": b.used,
            "prefix_hit_rate": b.prefix_hit_rate,
        }

    # ------------------------------------------------------------------ the step loop

    def schedule_step(self) -> PlannedStep | None:
        """The next step's batch, or None when there is nothing to run now (``stalled``
        tells whether requests wait for blocks that others will give back)."""
        batch = self.scheduler.schedule()
        self.stalled = batch.is_empty and self.scheduler.has_unfinished()
        if batch.is_empty:
            if self.stalled and not self.blocks_pending_release():
                raise RuntimeError("no request can be scheduled: the KV cache is too small")
            return None
        now = time.monotonic()
        for seq in batch.seqs:
            req = self.requests.get(seq.request_id)
            if req is not None and req.first_scheduled_time is None:
                req.first_scheduled_time = now
        return PlannedStep(batch, self._to_steps(batch))

    def process_step(self, planned: PlannedStep, out: SamplerOutput) -> list[RequestOutput]:
        """Advances progress, appends the sampled tokens and returns the outputs of the
        requests that got one. Requests aborted while the step ran are skipped."""
        batch, steps = planned.batch, planned.steps
        self.scheduler.on_step_done(batch)
        sampled = [seq for seq, s in zip(batch.seqs, steps, strict=True) if s.sample]
        now = time.monotonic()
        results = []
        for seq, token, lp in zip(sampled, out.token_ids, out.logprobs, strict=True):
            if seq.status is SequenceStatus.FINISHED:  # aborted during the forward
                continue
            results.append(self._on_token(seq, token, lp, now))
        return results

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns the requests that got a token (finished ones
        are then forgotten)."""
        planned = self.schedule_step()
        if planned is None:
            return []
        t0 = time.perf_counter()
        out = self.executor.execute(planned.steps)
        self.last_step = step_stats(planned.steps, time.perf_counter() - t0)
        return self.process_step(planned, out)

    async def step_async(self) -> list[RequestOutput]:
        """``step`` with the forward awaited, so that an event loop serves meanwhile."""
        planned = self.schedule_step()
        if planned is None:
            return []
        t0 = time.perf_counter()
        out = await execute_async(self.executor, planned.steps)
        self.last_step = step_stats(planned.steps, time.perf_counter() - t0)
        return self.process_step(planned, out)

    def _to_steps(self, batch: ScheduledBatch) -> list[SeqStep]:
        steps = []
        for i, seq in enumerate(batch.seqs):
            start = seq.num_computed_tokens
            n = batch.num_tokens[i]
            table, appended = self._tables.diff(seq.request_id, seq.block_table)
            steps.append(
                SeqStep(
                    seq.request_id,
                    seq.token_ids[start : start + n],
                    start,
                    table,
                    batch.needs_sample(i),
                    seq.params,
                    appended,
                    seq.num_output_tokens,
                )
            )
        return steps

    def _on_token(
        self, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float
    ) -> RequestOutput:
        """Appends a sampled token; stops and forgets the request when it is done."""
        reason = self._append(seq, token, lp, now)
        if reason is not None:
            return self._finish(seq, reason, now)
        return self._output(self.requests[seq.request_id])

    def _append(
        self, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float
    ) -> FinishReason | None:
        """Appends ``token`` (and detokenizes it); returns why the request must stop."""
        req = self.requests[seq.request_id]
        seq.append_token(token)
        if lp is not None:
            seq.logprobs.append(lp)
        if req.first_token_time is None:
            req.first_token_time = now
        reason = check_stop(seq, self.eos_token_ids, self.max_model_len)
        if req.detok is not None:
            req.detok.add([token])
            if req.detok.stopped:
                reason = FinishReason.STOP
        return reason

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> RequestOutput:
        """Stops ``seq`` (its blocks go back), forgets it and returns its last output."""
        req = self.requests.pop(seq.request_id)
        self.scheduler.finish(seq, reason)
        req.finish_time = now
        if req.detok is not None:
            req.detok.flush()
        self.free_request_state([seq.request_id])
        return self._output(req)

    def _output(self, req: Request) -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=req.detok.text if req.detok is not None else "",
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=list(seq.logprobs),
            arrival_time=seq.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            finish_time=req.finish_time,
        )
