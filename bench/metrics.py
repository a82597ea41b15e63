"""Per-request records and the metrics of DistServe (Zhong et al., OSDI 2024).

All times of a record are seconds on one monotonic clock, from the start of the run:

- TTFT = first token − arrival. The arrival is the request's scheduled send time, so
  a late client counts against the system (an open-loop benchmark must not hide it).
- TPOT = (last token − first token) / (n − 1) over the n tokens received. A one-token
  output has no inter-token gap: its TPOT is 0 and it meets any TPOT SLO.
- A request attains its SLO when both TTFT ≤ ttft_s and TPOT ≤ tpot_s. A failed
  request (status other than ``ok``) misses whatever its times.
- SLO attainment = share of all requests that attain; goodput = the highest request
  rate whose attainment is at least the target (90%), found by binary search on the
  rate; per-worker goodput = goodput / workers (GPUs or CPU workers provisioned).
- SLO scale multiplies both SLOs by one factor; the "tighter SLO" is the smallest
  scale at which the target is still met.

Latency percentiles use linear interpolation between order statistics (numpy's
default) over the requests that finished ``ok``. No torch import.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PHASES = ("queue_ms", "prefill_ms", "transfer_ms", "decode_ms")
PERCENTILES = (50.0, 90.0, 99.0)
GOODPUT_STATUSES = ("found", "below_lo", "at_hi")


@dataclass
class RequestRecord:
    """What the client saw of one request.

    ``token_times`` holds one client-side arrival time per token received (tokens of
    one streamed message share its time); ``status`` is ``ok`` or the gRPC status name
    (``RESOURCE_EXHAUSTED``, ``DEADLINE_EXCEEDED``, ...); ``timings`` are the server's
    final per-phase timings (``queue_ms``, ``prefill_ms``, ``transfer_ms``,
    ``decode_ms``, ``ttft_ms``, ``mean_tpot_ms``, ``transfer_bytes``); ``sent_s`` is
    when the client actually started the call (``sent_s − arrival_s`` is its lag)."""

    index: int
    arrival_s: float
    first_token_s: float | None
    token_times: list[float]
    finish_s: float | None
    status: str
    prompt_len: int
    output_len: int
    timings: dict[str, float] = field(default_factory=dict)
    sent_s: float | None = None
    finish_reason: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """Finished normally with at least one token."""
        return self.status == "ok" and bool(self.token_times) and self.finish_s is not None

    @property
    def ttft_s(self) -> float | None:
        """First token − arrival; None without a first token."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """(last − first token) / (n − 1); 0 for one token; None unless ``ok``."""
        if not self.ok:
            return None
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else 0.0

    @property
    def e2e_s(self) -> float | None:
        """Finish − arrival; None unless ``ok``."""
        return None if not self.ok or self.finish_s is None else self.finish_s - self.arrival_s

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``from_json`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RequestRecord:
        """The record that ``to_json`` wrote."""
        return cls(**obj)


@dataclass(frozen=True)
class SLO:
    """Per-request latency targets, in seconds."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"SLO {name} must be > 0, got {value}")

    def scaled(self, factor: float) -> SLO:
        """Both SLOs multiplied by ``factor`` (DistServe's SLO scale)."""
        if not factor > 0:
            raise ValueError(f"SLO scale must be > 0, got {factor}")
        return SLO(self.ttft_s * factor, self.tpot_s * factor)

    def to_json(self) -> dict[str, float]:
        """In milliseconds, as the CLI takes them."""
        return {"ttft_ms": self.ttft_s * 1e3, "tpot_ms": self.tpot_s * 1e3}


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """Both TTFT and TPOT within the SLO, and the request finished ``ok``."""
    ttft, tpot = record.ttft_s, record.tpot_s
    return ttft is not None and tpot is not None and ttft <= slo.ttft_s and tpot <= slo.tpot_s


def _nonempty(records: Sequence[RequestRecord]) -> Sequence[RequestRecord]:
    if not records:
        raise ValueError("no request records (0 requests)")
    return records


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    """Share of all requests that meet both SLOs (failed ones miss)."""
    return sum(meets_slo(r, slo) for r in _nonempty(records)) / len(records)


def required_scale(record: RequestRecord, slo: SLO) -> float:
    """The smallest SLO scale the request meets: max(TTFT/ttft_s, TPOT/tpot_s);
    infinite for a failed request."""
    ttft, tpot = record.ttft_s, record.tpot_s
    if ttft is None or tpot is None:
        return math.inf
    return max(ttft / slo.ttft_s, tpot / slo.tpot_s, 0.0)


def attainment_vs_scale(
    records: Sequence[RequestRecord], slo: SLO, scales: Iterable[float]
) -> list[tuple[float, float]]:
    """``(scale, attainment)`` with both SLOs multiplied by each scale."""
    return [(s, attainment(records, slo.scaled(s))) for s in scales]


def min_slo_scale(records: Sequence[RequestRecord], slo: SLO, target: float = 0.9) -> float:
    """The smallest SLO scale whose attainment is at least ``target`` (the "tighter
    SLO" of DistServe, exact rather than searched); infinite when more than
    ``1 − target`` of the requests failed."""
    if not 0 < target <= 1:
        raise ValueError(f"target attainment must be in (0, 1], got {target}")
    need = sorted(required_scale(r, slo) for r in _nonempty(records))
    k = math.ceil(target * len(need) - 1e-9)  # requests that must meet the SLO
    return need[k - 1]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between order
    statistics, like ``numpy.percentile``'s default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50, p90 and p99 in milliseconds (None for no values)."""
    keys = ["mean", *(f"p{q:g}" for q in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys)
    ms = [v * 1e3 for v in values_s]
    values = [sum(ms) / len(ms), *(percentile(ms, q) for q in PERCENTILES)]
    return dict(zip(keys, values, strict=True))


def phase_breakdown(records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """Mean of each server phase (queue, prefill, transfer, decode; ms) over the
    ``ok`` requests that carry server timings."""
    rows = [r.timings for r in records if r.ok and r.timings]
    return {p: (sum(t.get(p, 0.0) for t in rows) / len(rows) if rows else None) for p in PHASES}


def per_worker(rate: float, workers: int) -> float:
    """Per-worker goodput: ``rate / workers``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return rate / workers


@dataclass(frozen=True)
class GoodputResult:
    """The outcome of ``goodput``. ``rate`` is the highest evaluated rate whose
    attainment reached the target; ``status`` is ``found`` (the threshold lies within
    ``tol`` above it), ``at_hi`` (even ``hi`` reached the target: goodput ≥ hi) or
    ``below_lo`` (``lo`` missed it: ``rate`` is 0). ``points`` are every
    ``(rate, attainment)`` evaluated, in order."""

    rate: float
    status: str
    target: float
    points: list[tuple[float, float]]

    def per_worker(self, workers: int) -> float:
        """Goodput / workers."""
        return per_worker(self.rate, workers)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "rate": self.rate,
            "status": self.status,
            "target": self.target,
            "points": [list(p) for p in self.points],
        }


def goodput(
    measure: Callable[[float], float],
    lo: float,
    hi: float,
    target: float = 0.9,
    tol: float = 0.05,
) -> GoodputResult:
    """Binary search for the highest rate whose attainment ``measure(rate)`` is at
    least ``target``, assuming attainment does not increase with the rate. Evaluates
    ``lo``, then ``hi``, then halves ``[lo, hi]`` until it is narrower than ``tol``
    (req/s): about log2((hi − lo) / tol) + 2 measurements."""
    if not 0 < lo < hi or not math.isfinite(hi):
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    if not 0 < target <= 1:
        raise ValueError(f"target attainment must be in (0, 1], got {target}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0 req/s, got {tol}")
    points: list[tuple[float, float]] = []

    def good(rate: float) -> bool:
        value = float(measure(rate))
        points.append((rate, value))
        return value >= target

    if not good(lo):
        return GoodputResult(0.0, "below_lo", target, points)
    if good(hi):
        return GoodputResult(hi, "at_hi", target, points)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if good(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, "found", target, points)


def summarize(
    records: Sequence[RequestRecord],
    slo: SLO,
    target: float = 0.9,
    scales: Sequence[float] = (),
) -> dict[str, Any]:
    """The JSON-serialisable summary of one run: counts and statuses, attainment (both
    SLOs, and each alone), TTFT/TPOT/end-to-end stats (ms), the server's mean phase
    times, throughput, the client's send lag, the tightest SLO scale reaching
    ``target`` and the attainment at each of ``scales``."""
    _nonempty(records)
    ok = [r for r in records if r.ok]
    ttfts = [t for r in ok if (t := r.ttft_s) is not None]
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    e2es = [t for r in ok if (t := r.e2e_s) is not None]
    lags = [r.sent_s - r.arrival_s for r in records if r.sent_s is not None]
    arrivals = [r.arrival_s for r in records]
    end = max((r.finish_s for r in ok if r.finish_s is not None), default=max(arrivals))
    span = end - min(arrivals)
    n_tokens = sum(len(r.token_times) for r in ok)
    min_scale = min_slo_scale(records, slo, target)
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "statuses": dict(Counter(r.status for r in records)),
        "slo": slo.to_json(),
        "target": target,
        "attainment": attainment(records, slo),
        "ttft_attainment": sum(t <= slo.ttft_s for t in ttfts) / len(records),
        "tpot_attainment": sum(t <= slo.tpot_s for t in tpots) / len(records),
        "ttft_ms": latency_stats(ttfts),
        "tpot_ms": latency_stats(tpots),
        "e2e_ms": latency_stats(e2es),
        "phases_ms": phase_breakdown(records),
        "send_lag_ms": latency_stats(lags),
        "duration_s": span,
        "completed_req_s": len(ok) / span if span > 0 else None,
        "output_tok_s": n_tokens / span if span > 0 else None,
        "min_slo_scale": min_scale if math.isfinite(min_scale) else None,
        "slo_scale": [list(p) for p in attainment_vs_scale(records, slo, scales)],
    }
