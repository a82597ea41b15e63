"""The handoff: what a finished prefill leaves for a decode instance (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprobs
from kvtransfer.layout import KVLayout


@dataclass(frozen=True)
class Handoff:
    """A prompt whose KV sits in ``block_ids`` of prefill instance ``source`` (layout
    ``layout``) under a lease until ``lease_deadline`` (monotonic seconds), with its
    first sampled token. The decode instance continues from ``first_token``."""

    request_id: str
    prompt_token_ids: list[int]
    first_token: int
    params: SamplingParams
    block_ids: tuple[int, ...]
    source: str
    layout: KVLayout
    lease_deadline: float
    arrival_time: float
    first_token_time: float
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"handoff {self.request_id!r} has an empty prompt")
        if not self.block_ids:
            raise ValueError(f"handoff {self.request_id!r} has no blocks")


class KVSource(Protocol):
    """The prefill side of a transfer as the decode instance sees it."""

    instance_id: str
    layout: KVLayout

    @property
    def workers(self) -> list[Any]:
        """Worker actors by rank (the transport reads from them)."""
        ...

    def claim(self, request_id: str, hold_s: float) -> bool:
        """Extends the lease for reading; False if it is gone."""
        ...

    def release(self, request_id: str) -> bool:
        """Acknowledges (or gives up): the source frees the blocks."""
        ...
