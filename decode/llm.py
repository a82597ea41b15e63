"""The single-instance engine: continuous batching with local prefill, offline API.

It is the colocated baseline and the core a decode instance grows from: the scheduler
decides each step, the model runner computes it, this class appends tokens, detokenizes
and stops requests.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from decode.scheduler import ScheduledBatch, Scheduler
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.executor import Executor, SupportsShutdown, make_executor
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, SeqStep
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence, TokenLogprobs
from engine.stopping import check_stop
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

Prompt = str | list[int]


@dataclass
class RequestOutput:
    """A request's output so far (``finished`` once it stopped)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    first_token_time: float | None = None
    finish_time: float | None = None


class LLM:
    """One instance in one process. ``generate`` serves many prompts at once;
    ``add_request`` / ``step`` / ``abort`` drive it incrementally.

    ``executor`` runs the steps; by default this process's ModelRunner for one rank and
    Ray workers (``RayExecutor``) for tp x pp > 1. ``shutdown()`` frees it.
    """

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
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()

    @property
    def runner(self) -> ModelRunner:
        """The in-process model runner (tp = 1); TypeError when ranks run elsewhere."""
        if not isinstance(self.executor, ModelRunner):
            raise TypeError(f"this LLM runs on {type(self.executor).__name__}, not in-process")
        return self.executor

    def shutdown(self) -> None:
        """Releases the executor's workers (a no-op for the in-process runner)."""
        if isinstance(self.executor, SupportsShutdown):
            self.executor.shutdown()

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: object) -> LLM:
        return cls(EngineConfig(model=model, **kwargs))  # type: ignore[arg-type]

    def encode(self, prompt: Prompt) -> list[int]:
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

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validates and queues a request; raises ValueError (naming the bad value)
        without touching any other request."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
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
        self.requests[rid] = _Request(seq, detok)
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stops a request in any phase and frees its blocks; False if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if not req.seq.is_finished:
            self.scheduler.abort(request_id)
        self.executor.free([request_id])
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns the requests that got a token (finished ones
        are then forgotten)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("no request can be scheduled: the KV cache is too small")
            return []
        steps = self._to_steps(batch)
        sampled = [seq for seq, s in zip(batch.seqs, steps, strict=True) if s.sample]
        out = self.executor.execute(steps)
        self.scheduler.on_step_done(batch)
        now = time.monotonic()
        results = []
        for seq, token, lp in zip(sampled, out.token_ids, out.logprobs, strict=True):
            results.append(self._advance(seq, token, lp, now))
        return results

    def _to_steps(self, batch: ScheduledBatch) -> list[SeqStep]:
        steps = []
        for i, seq in enumerate(batch.seqs):
            start = seq.num_computed_tokens
            n = batch.num_tokens[i]
            steps.append(
                SeqStep(
                    seq.request_id,
                    seq.token_ids[start : start + n],
                    start,
                    seq.block_table,
                    batch.needs_sample(i),
                    seq.params,
                )
            )
        return steps

    def _advance(
        self, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float
    ) -> RequestOutput:
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
        if reason is not None:
            self.scheduler.finish(seq, reason)
            req.finish_time = now
            if req.detok is not None:
                req.detok.flush()
            self.requests.pop(seq.request_id)
            self.executor.free([seq.request_id])
        return self._output(req)

    def _output(self, req: _Request) -> RequestOutput:
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
            first_token_time=req.first_token_time,
            finish_time=req.finish_time,
        )

    def generate(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs in prompt order. Invalid prompts raise
        ValueError before any work starts."""
        plist = (
            list(params) if isinstance(params, Seq) else [params or SamplingParams()] * len(prompts)
        )
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        for p in prompts:
            self.encode(p)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(rids), disable=not use_tqdm, desc="generate")
        while len(done) < len(rids):
            for o in self.step():
                if o.finished:
                    done[o.request_id] = o
                    bar.update(1)
        bar.close()
        return [done[r] for r in rids]
