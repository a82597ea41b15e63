"""What a routing policy sees and says (no torch).

The controller keeps one frozen ``PrefillView`` / ``DecodeView`` per instance and
replaces it when that instance's load changes (after each step), and with
``view.plus(request)`` for the chosen instances right after each decision, so building
them is off the request path and a burst between two steps does not pile onto one
instance. A view computes its terms (queue estimate, coefficients) when it is made,
off the request path: it reflects its model as of then. Per request the controller
builds one ``RouteRequest``; a policy returns a ``Decision``. Estimates (seconds) come
from each instance's ``LatencyModel``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from router.latency_model import LatencyModel


@dataclass(frozen=True)
class RouteRequest:
    """One request to place: its prompt length, its SLOs, the model's KV bytes per
    token, the expected output length (spreads stalls and, with ``transfer_in="tpot"``,
    the transfer over the output), and prefix tokens already cached, by instance id
    (may be empty): on a prefill instance they are not recomputed; on a decode
    instance they are not transferred nor, with local prefill, recomputed."""

    prompt_len: int
    ttft_s: float
    tpot_s: float
    kv_bytes_per_token: float
    expected_output_len: int = 128
    cached_tokens: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLOs must be > 0, got ttft_s={self.ttft_s}, tpot_s={self.tpot_s}")
        if not math.isfinite(self.kv_bytes_per_token) or self.kv_bytes_per_token < 0:
            raise ValueError(f"kv_bytes_per_token must be >= 0, got {self.kv_bytes_per_token!r}")
        if self.expected_output_len < 1:
            raise ValueError(f"expected_output_len must be >= 1, got {self.expected_output_len}")

    def uncached(self, instance_id: str) -> int:
        """Prompt tokens ``instance_id`` must compute (at least 1: the last token is
        always computed, as the block manager does)."""
        cached = self.cached_tokens.get(instance_id, 0)
        return max(1, self.prompt_len - cached)

    @property
    def kv_bytes(self) -> float:
        """Bytes of the prompt's whole KV cache."""
        return self.kv_bytes_per_token * self.prompt_len

    def kv_bytes_to(self, decode_id: str) -> float:
        """Bytes that move to ``decode_id``: the prompt's KV less the prefix it already
        caches (a decode instance pulls only the blocks it lacks)."""
        cached = self.cached_tokens.get(decode_id, 0)
        return self.kv_bytes_per_token * max(0, self.prompt_len - cached)


@dataclass(frozen=True)
class PrefillView:
    """One prefill instance's load. ``queued_prefill_tokens``: uncached prompt tokens
    queued or being prefilled, over ``queued_requests`` prompts;
    ``queued_prefill_sq_tokens`` their Σl² (None: assume equal lengths);
    ``max_num_batched_tokens`` the token budget per step (0: one prompt per step)."""

    instance_id: str
    queued_prefill_tokens: int
    queued_requests: int
    blocks_free: int
    block_size: int
    model: LatencyModel
    max_num_batched_tokens: int = 0
    queued_prefill_sq_tokens: int | None = None
    # (queue seconds, a, b, c), computed once when the view is made
    _terms: tuple[float, float, float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_counts(
            self,
            ("queued_prefill_tokens", "queued_requests", "blocks_free", "max_num_batched_tokens"),
        )
        tokens, n, sq = (
            self.queued_prefill_tokens,
            self.queued_requests,
            self.queued_prefill_sq_tokens,
        )
        budget = self.max_num_batched_tokens
        queue = prefill_seconds(self.model, tokens, n, budget, sq) if tokens and n else 0.0
        c = self.model.prefill.coefficients
        object.__setattr__(self, "_terms", (queue, c.a, c.b, c.c))

    @property
    def queue_s(self) -> float:
        """Predicted seconds to prefill everything queued now."""
        return self._terms[0]

    def estimate(self, request: RouteRequest) -> tuple[float, bool]:
        """(``ttft_s``, ``has_room``) in one pass: the policies' hot path."""
        u = request.prompt_len - request.cached_tokens.get(self.instance_id, 0)
        if u < 1:
            u = 1
        queue, a, b, c = self._terms
        budget = self.max_num_batched_tokens
        if budget > 0:
            steps, sq = -(-u // budget), u * min(u, budget)
        else:
            steps, sq = 1, u * u
        return queue + steps * a + b * u + c * sq, self.blocks_free * self.block_size >= u

    def ttft_s(self, request: RouteRequest) -> float:
        """Predicted time to first token here, before any KV transfer: the queue, then
        this prompt's uncached tokens."""
        return self.estimate(request)[0]

    def has_room(self, request: RouteRequest) -> bool:
        """Whether the uncached part's blocks are free now (else it waits for leases)."""
        return self.estimate(request)[1]

    def plus(self, request: RouteRequest) -> PrefillView:
        """This view with ``request`` queued: what the controller routes the next
        request against until the instance's next stats refresh."""
        u = request.uncached(self.instance_id)
        sq = self.queued_prefill_sq_tokens
        return replace(
            self,
            queued_prefill_tokens=self.queued_prefill_tokens + u,
            queued_requests=self.queued_requests + 1,
            blocks_free=max(0, self.blocks_free - -(-u // self.block_size)),
            queued_prefill_sq_tokens=None if sq is None else sq + u * u,
        )


@dataclass(frozen=True)
class DecodeView:
    """One decode instance's load: ``batch_size`` running sequences holding
    ``context_tokens`` in all; ``pending_handoffs`` waiting for room, with
    ``pending_tokens`` prompt tokens; ``local_prefill_tokens`` uncached tokens queued
    for local prefill here, over ``waiting_requests`` queued requests (local prefills,
    recomputes and preempted ones: what a colocated instance's queue holds)."""

    instance_id: str
    batch_size: int
    context_tokens: int
    pending_handoffs: int
    blocks_free: int
    block_size: int
    max_num_seqs: int
    model: LatencyModel
    pending_tokens: int = 0
    local_prefill_tokens: int = 0
    waiting_requests: int = 0
    # (TPOT before this prompt's context, b, tokens before this prompt's, spare blocks,
    # a sequence slot is free, running step seconds), computed once when made
    _terms: tuple[float, float, int, int, bool, float] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        _check_counts(self, _DECODE_COUNTS)
        c = self.model.decode.coefficients
        pending = self.pending_handoffs
        batch = self.batch_size + pending + 1
        tpot0 = c.a + c.b * (self.context_tokens + self.pending_tokens) + c.c * batch
        # ``LatencyModel.predict_decode`` from the coefficients read once above: the
        # view calls no model method (a simulated instance's model counts its steps).
        step = c.a + c.b * self.context_tokens + c.c * self.batch_size if self.batch_size else 0.0
        terms = (tpot0, c.b, self.pending_tokens + pending + 1, pending + self.batch_size)
        object.__setattr__(self, "_terms", (*terms, batch <= self.max_num_seqs, step))

    @property
    def step_s(self) -> float:
        """Predicted seconds of the decode step running now (0 when idle)."""
        return self._terms[5]

    def estimate(self, request: RouteRequest) -> tuple[float, bool]:
        """(``tpot_s``, ``has_room``) in one pass: the policies' hot path."""
        tpot0, b, tokens0, spare, slot, _ = self._terms
        length = request.prompt_len
        room = slot and self.blocks_free >= -(-(tokens0 + length) // self.block_size) + spare
        return tpot0 + b * length, room

    def tpot_s(self, request: RouteRequest) -> float:
        """Predicted seconds per output token once this request (and every pending
        handoff) is admitted."""
        return self.estimate(request)[0]

    def has_room(self, request: RouteRequest) -> bool:
        """The decode instance's admission rule, with pending handoffs admitted first:
        a sequence slot, and the blocks of every prompt plus one spare block per
        running sequence."""
        return self.estimate(request)[1]

    def local_prefill(self, request: RouteRequest) -> tuple[float, float]:
        """(TTFT, TPOT) if this instance prefills the request itself: TTFT waits for
        the running step and the queued local prefills; TPOT adds the prefill's stall
        of the batch, spread over the expected output."""
        u = request.uncached(self.instance_id)
        prefill = prefill_seconds(self.model, u, 1, 0)
        queued = self.local_prefill_tokens
        ahead = prefill_seconds(self.model, queued, 1, 0) if queued > 0 else 0.0
        ttft = self.step_s + ahead + prefill
        stall = prefill / max(1, request.expected_output_len - 1)
        return ttft, self.tpot_s(request) + stall

    def plus(self, request: RouteRequest, local: bool) -> DecodeView:
        """This view with ``request`` on its way (a pending handoff; ``local``: queued
        for local prefill here), until the instance's next stats refresh."""
        u = request.uncached(self.instance_id) if local else 0
        return replace(
            self,
            pending_handoffs=self.pending_handoffs + 1,
            pending_tokens=self.pending_tokens + request.prompt_len,
            local_prefill_tokens=self.local_prefill_tokens + u,
        )


@dataclass(frozen=True)
class Decision:
    """Where a request goes. ``prefill_id`` None: the decode instance prefills it itself
    (conditional disaggregation). ``admit`` False: answer RESOURCE_EXHAUSTED now (the
    policy rejects SLO misses and this one is predicted to miss)."""

    prefill_id: str | None
    decode_id: str
    predicted_ttft_s: float
    predicted_tpot_s: float
    meets_slo: bool
    admit: bool
    reason: str


_DECODE_COUNTS = (
    "batch_size",
    "context_tokens",
    "pending_handoffs",
    "blocks_free",
    "pending_tokens",
    "local_prefill_tokens",
    "waiting_requests",
)


def _check_counts(view: Any, names: tuple[str, ...]) -> None:
    """ValueError naming the first of ``names`` that is negative (and a block size < 1)."""
    for name in names:
        if getattr(view, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(view, name)}")
    if view.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {view.block_size}")


def prefill_seconds(
    model: LatencyModel, tokens: int, prompts: int, budget: int, sq: int | None = None
) -> float:
    """Predicted seconds to prefill ``tokens`` uncached tokens over ``prompts`` prompts
    (Σl² ``sq``; None: equal lengths) in steps of at most ``budget`` tokens (0: one
    prompt per step). Chunking bounds Σ(chunk²) by budget·tokens."""
    c = model.prefill.coefficients
    if sq is None:
        sq = tokens * tokens // max(1, prompts)
    if budget > 0:
        steps = -(-tokens // budget)
        sq = min(sq, budget * tokens)
    else:
        steps = prompts
    return steps * c.a + c.b * tokens + c.c * sq
