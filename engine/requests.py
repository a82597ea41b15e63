"""A request's state and outputs inside an instance, and per-step statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.model_runner import SeqStep
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, TokenLogprobs
from engine.tokenizer import IncrementalDetokenizer


class RequestIdInUse(ValueError):
    """A request id that an instance (or the deployment) already serves."""

    def __init__(self, request_id: str):
        super().__init__(f"request id {request_id!r} is already in use")
        self.request_id = request_id


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
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class Request:
    """An instance's bookkeeping for one request next to its ``Sequence``."""

    seq: Sequence
    detok: IncrementalDetokenizer | None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class PlannedStep:
    """One step between ``schedule_step`` and ``process_step``."""

    batch: ScheduledBatch
    steps: list[SeqStep]


@dataclass(frozen=True)
class StepStats:
    """What one step computed and how long its forward took (the latency model's
    sample): the query length of each prefill chunk, the single-token entries and the
    context tokens they attend to."""

    prefill_lengths: tuple[int, ...]
    num_decodes: int
    decode_context_tokens: int
    seconds: float


def step_stats(steps: list[SeqStep], seconds: float) -> StepStats:
    prefill = tuple(len(s.token_ids) for s in steps if len(s.token_ids) > 1)
    decodes = [s for s in steps if len(s.token_ids) == 1]
    context = sum(s.start_pos + 1 for s in decodes)
    return StepStats(prefill, len(decodes), context, seconds)


class BlockTableDiffs:
    """The driver's side of the per-step block-table diffs: what each runner already
    holds. A table that only grew since the last step is sent as its new ids; a reset
    one (``BlockManager.free`` gives the sequence a new list, e.g. on preemption) or an
    unseen one is sent whole."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[list[int], int]] = {}

    def diff(self, request_id: str, table: list[int]) -> tuple[list[int], bool]:
        """(block ids to send, whether they are appended to what was sent before)."""
        prev = self._sent.get(request_id)
        self._sent[request_id] = (table, len(table))
        if prev is not None and prev[0] is table and len(table) >= prev[1]:
            return table[prev[1] :], True
        return list(table), False

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._sent.pop(rid, None)
