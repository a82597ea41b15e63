"""The single-instance engine: continuous batching with local prefill, offline API.

It is the colocated baseline and the core a decode instance grows from: the scheduler
decides each step, ``engine.core.EngineCore`` computes it, appends tokens, detokenizes
and stops requests.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tqdm import tqdm

from engine.config import EngineConfig
from engine.core import EngineCore, Prompt, RequestOutput
from engine.executor import Executor
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

__all__ = ["LLM", "Prompt", "RequestOutput"]


class LLM(EngineCore):
    """One instance in one process. ``generate`` serves many prompts at once;
    ``add_request`` / ``step`` / ``abort`` drive it incrementally.

    ``executor`` runs the steps; by default this process's ModelRunner for one rank and
    Ray workers (``RayExecutor``) for tp x pp > 1. ``shutdown()`` frees it.
    """

    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        super().__init__(config, executor)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: object) -> LLM:
        return cls(EngineConfig(model=model, **kwargs))  # type: ignore[arg-type]

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validates and queues a request; raises ValueError (naming the bad value)
        without touching any other request."""
        seq = self.new_request(prompt, params, request_id)
        self.scheduler.add(seq)
        return seq.request_id

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
