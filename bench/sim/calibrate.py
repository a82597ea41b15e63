"""What a measured run says about its steps beyond the latency model.

The router's latency model times the forward only (``execute``), is fitted on relative
error with a prior and the start-up profile in its window, and predicts a mean: the
steps a run actually takes are longer by the scheduling, messaging and streaming
around each forward, and spread widely around it on a machine whose cores the
instances, the client and other work share. Here the steps of a run are recovered
from the load generator's records (``bench.metrics.RequestRecord``) and set against
the model:

- prefill: the requests that shared a one-step prefill report the very same server
  ``prefill_ms`` (scheduled → first token, both stamped once per step), so grouping by
  it gives each step's prompt lengths and duration;
- decode: every running request gets one token per decode step, streamed at once, so
  the client's token arrival times fall into clusters, one per step; between two
  consecutive clusters with no newcomer (a newcomer means a KV pull ran in between)
  lies one step, whose batch and context are known from the lengths.

``step_ratios`` (observed ÷ predicted, one per step) feed ``PoolSpec.step_time_ratios``:
each simulated step draws one, so the simulation sees the run's spread of step times
and its total busy time. ``split_contended`` sets apart the decode steps that ran
beside a prefill step (``PoolSpec.contended_step_time_ratios``). ``client_lag`` is what
the client sees on top of the server's own TTFT (the gRPC hops and the event loop),
added to every simulated token time. No torch.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.metrics import RequestRecord
from router.latency_model import LatencyModel

# Two tokens of one decode step reach the client within this share of a step.
CLUSTER_SHARE = 0.5
MIN_CLUSTER_GAP_S = 0.002


@dataclass(frozen=True)
class ObservedStep:
    """One step recovered from a run: predicted and observed seconds, and when it
    ended (the client's clock: seconds from the start of the run)."""

    predicted_s: float
    observed_s: float
    end_s: float


@dataclass
class _Group:
    """The requests that reported one ``prefill_ms``: when their prefill started and
    ended on the client's clock (sent + queue, + prefill) and their prompt lengths."""

    start_s: float
    seconds: float
    first_token_s: float
    lengths: list[int]

    @property
    def end_s(self) -> float:
        return self.start_s + self.seconds

    def disturbed_by(self, other: _Group, tol_s: float) -> bool:
        """Whether ``other`` shows that this group's prefill was not one step of its
        own prompts: it started in the same step but finished earlier (this group was
        chunked on), it started while this one was still prefilling, or it finished in
        the same step having started earlier (its last chunk shared the step)."""
        same_start = abs(other.start_s - self.start_s) < tol_s
        same_end = abs(other.end_s - self.end_s) < tol_s
        return (
            (same_start and other.end_s < self.end_s - tol_s)
            or self.start_s + tol_s < other.start_s < self.end_s - tol_s
            or (same_end and other.start_s < self.start_s - tol_s)
        )


def _sent(r: RequestRecord) -> float:
    return r.sent_s if r.sent_s is not None else r.arrival_s


def _prefill_groups(records: Sequence[RequestRecord]) -> list[_Group]:
    by_ms: dict[float, list[RequestRecord]] = {}
    for r in records:
        if r.ok and r.first_token_s is not None and r.timings.get("prefill_ms", 0.0) > 0:
            by_ms.setdefault(r.timings["prefill_ms"], []).append(r)
    groups = []
    for ms, rs in by_ms.items():
        starts = [_sent(r) + r.timings.get("queue_ms", 0.0) / 1e3 for r in rs]
        start = statistics.median(starts)
        first = min(r.first_token_s for r in rs if r.first_token_s is not None)
        groups.append(_Group(start, ms / 1e3, first, [r.prompt_len for r in rs]))
    return groups


def prefill_steps(
    records: Sequence[RequestRecord], model: LatencyModel, max_num_batched_tokens: int
) -> list[ObservedStep]:
    """The one-step prefills of a run, each against ``model``: groups of requests with
    the same server ``prefill_ms`` whose prompts fit one step's budget and whose
    step no other group shows to have been anything else (``_Group.disturbed_by``;
    with several prefill instances their overlapping steps only drop a few more)."""
    groups = _prefill_groups(records)
    tol = max(MIN_CLUSTER_GAP_S, CLUSTER_SHARE * model.predict_prefill([1]))
    steps = [
        ObservedStep(model.predict_prefill(g.lengths), g.seconds, g.first_token_s)
        for g in groups
        if sum(g.lengths) <= max_num_batched_tokens
        and not any(g.disturbed_by(h, tol) for h in groups if h is not g)
    ]
    return sorted(steps, key=lambda s: s.end_s)


@dataclass
class _Cluster:
    """The decode tokens of one step: when the first reached the client, and per
    request index its output token index (≥ 1)."""

    start_s: float
    tokens: dict[int, int]


def _clusters(records: Sequence[RequestRecord], gap_s: float) -> list[_Cluster]:
    """Decode tokens by step, in time order. A cluster ends at a gap over ``gap_s`` or
    at a request's second token (a step gives each request one)."""
    events = sorted(
        (t, r.index, k) for r in records if r.ok for k, t in enumerate(r.token_times) if k >= 1
    )
    clusters: list[_Cluster] = []
    last = float("-inf")
    for t, index, k in events:
        if not clusters or t - last > gap_s or index in clusters[-1].tokens:
            clusters.append(_Cluster(t, {}))
        clusters[-1].tokens[index] = k
        last = t
    return clusters


def decode_steps(records: Sequence[RequestRecord], model: LatencyModel) -> list[ObservedStep]:
    """The back-to-back decode steps of a run, each against ``model``: consecutive
    clusters where every request of the later one had its previous token in the
    earlier one (no newcomer, whose KV pull ran in between; no preempted one back)."""
    prompt = {r.index: r.prompt_len for r in records}
    gap = max(MIN_CLUSTER_GAP_S, CLUSTER_SHARE * model.predict_decode(1, 1))
    clusters = _clusters(records, gap)
    steps = []
    for prev, cur in itertools.pairwise(clusters):
        if not all(prev.tokens.get(i) == k - 1 for i, k in cur.tokens.items()):
            continue
        context = sum(prompt[i] + k for i, k in cur.tokens.items())
        predicted = model.predict_decode(len(cur.tokens), context)
        steps.append(ObservedStep(predicted, cur.start_s - prev.start_s, cur.start_s))
    return steps


def split_contended(
    steps: Sequence[ObservedStep], records: Sequence[RequestRecord]
) -> tuple[list[ObservedStep], list[ObservedStep]]:
    """``steps`` (of a decode instance) split into (free, contended): contended ones
    overlapped some prefill step (``_prefill_groups``: every prefill of the run, from
    its requests' timings) for more than half their duration. On a shared host they are
    slower (measured here: 10-20%) and come in runs while the prefill instance is busy,
    which independent draws from one pool would average away."""
    busy = sorted((g.start_s, g.end_s) for g in _prefill_groups(records))
    free: list[ObservedStep] = []
    contended: list[ObservedStep] = []
    for s in steps:
        lo, hi = s.end_s - s.observed_s, s.end_s
        overlap = sum(max(0.0, min(hi, e) - max(lo, b)) for b, e in busy if b < hi and e > lo)
        (contended if overlap > 0.5 * s.observed_s else free).append(s)
    return free, contended


def step_ratios(steps: Sequence[ObservedStep]) -> tuple[float, ...]:
    """Observed ÷ predicted seconds of each step (those with a positive prediction),
    scaled together so that their mean is Σ observed ÷ Σ predicted: drawn per step,
    they give the simulated steps the run's spread and its total busy time (the
    plain mean of ratios would over-weight short steps, whose fixed costs weigh more
    relative to the model)."""
    kept = [s for s in steps if s.predicted_s > 0]
    if not kept:
        return ()
    ratios = [s.observed_s / s.predicted_s for s in kept]
    total = sum(s.observed_s for s in kept) / sum(s.predicted_s for s in kept)
    scale = total / statistics.fmean(ratios)
    return tuple(r * scale for r in ratios)


def client_lag(records: Sequence[RequestRecord]) -> float:
    """Median seconds between the server's TTFT and the client's (0 without timings)."""
    lags = [
        ttft - r.timings["ttft_ms"] / 1e3
        for r in records
        if r.ok and (ttft := r.ttft_s) is not None and r.timings.get("ttft_ms", 0.0) > 0
    ]
    return max(0.0, statistics.median(lags)) if lags else 0.0
