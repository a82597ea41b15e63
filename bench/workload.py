"""Request workloads for the load generator: when each request arrives and how long it is.

Arrivals are open loop (a request is sent at its time whatever the earlier ones are
doing): Poisson at a rate λ, gamma with a chosen coefficient of variation of the
inter-arrival times (CV=1 is Poisson; above 1 is burstier), or a trace's own timestamps
scaled to a target mean rate. Every process is seeded and deterministic.

Lengths come from a dataset (``bench.traces``: the Azure LLM inference traces of Patel
et al., Splitwise, ISCA 2024, CC-BY 4.0; a synthetic distribution; or a JSONL file) and
are scaled down by one factor to fit the model's ``max_model_len``; the factor is
reported with the workload.

No torch import.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.traces import SyntheticLengths, Trace, load_dataset

ARRIVALS = ("poisson", "gamma", "trace")


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` arrival times (s) of a Poisson process at ``rate`` req/s; the first at 0."""
    return gamma_arrivals(n, rate, 1.0, seed)


def gamma_arrivals(n: int, rate: float, cv: float, seed: int = 0) -> list[float]:
    """``n`` arrival times (s), the first at 0, whose inter-arrival gaps are gamma with
    mean ``1/rate`` and coefficient of variation ``cv`` (shape 1/cv²). CV=1 is Poisson,
    CV=0 evenly spaced, CV>1 bursty."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be > 0 req/s, got {rate}")
    if not (cv >= 0 and math.isfinite(cv)):
        raise ValueError(f"cv must be >= 0, got {cv}")
    if cv == 0:
        gaps = np.full(n - 1, 1.0 / rate)
    else:
        shape = 1.0 / (cv * cv)
        gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def mean_rate(arrivals: Sequence[float]) -> float:
    """Requests per second over the span of the arrivals: ``(n − 1) / (last − first)``."""
    if len(arrivals) < 2 or arrivals[-1] <= arrivals[0]:
        raise ValueError(f"mean rate needs >= 2 arrivals over a positive span, got {arrivals!r}")
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def interarrival_cv(arrivals: Sequence[float]) -> float:
    """Coefficient of variation (std / mean) of the gaps between arrivals."""
    gaps = np.diff(np.asarray(arrivals, dtype=np.float64))
    if len(gaps) < 2 or gaps.mean() <= 0:
        raise ValueError(f"the CV needs >= 3 arrivals over a positive span, got {len(arrivals)}")
    return float(gaps.std() / gaps.mean())


def scale_arrivals(timestamps: Sequence[float], rate: float) -> list[float]:
    """A trace's timestamps shifted to start at 0 and stretched so that their mean rate
    (see ``mean_rate``) is exactly ``rate``; the shape of the trace (bursts) is kept."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be > 0 req/s, got {rate}")
    if any(b < a for a, b in itertools.pairwise(timestamps)):
        raise ValueError("trace timestamps must not decrease")
    if len(timestamps) == 1:
        return [0.0]
    factor = mean_rate(timestamps) / rate
    t0 = timestamps[0]
    return [(t - t0) * factor for t in timestamps]


@dataclass(frozen=True)
class FittedLengths:
    """Lengths after ``fit_lengths``: ``scale`` multiplied both, ``clipped`` requests
    were cut further to fit (only when fitting a quantile below 1)."""

    prompt_lens: list[int]
    output_lens: list[int]
    scale: float
    clipped: int


def _check_lengths(prompt_lens: Sequence[int], output_lens: Sequence[int]) -> None:
    if len(prompt_lens) != len(output_lens) or not prompt_lens:
        raise ValueError(
            f"need as many prompt as output lengths (>= 1), got {len(prompt_lens)} "
            f"and {len(output_lens)}"
        )
    bad = [v for v in (*prompt_lens, *output_lens) if v < 1]
    if bad:
        raise ValueError(f"lengths must be >= 1, got {bad[0]}")


def length_scale(
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    max_model_len: int,
    quantile: float = 1.0,
) -> float:
    """The factor (≤ 1, never scaling up) that makes the ``quantile`` of
    ``prompt + output`` fit ``max_model_len`` (quantile 1.0: the longest request)."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    _check_lengths(prompt_lens, output_lens)
    totals = np.add(prompt_lens, output_lens, dtype=np.float64)
    return min(1.0, max_model_len / float(np.quantile(totals, quantile, method="higher")))


def fit_lengths(
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    max_model_len: int,
    quantile: float = 1.0,
    scale: float | None = None,
) -> FittedLengths:
    """Scales every prompt and output length by one factor: ``scale`` if given, else
    ``length_scale(..., quantile)`` of these lengths. Lengths are floored with a
    minimum of 1 token each; requests still too long (quantile < 1, or a ``scale``
    from other data) are cut proportionally and counted in ``clipped``. Afterwards
    every ``prompt + output <= max_model_len``."""
    if scale is None:
        scale = length_scale(prompt_lens, output_lens, max_model_len, quantile)
    elif not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    _check_lengths(prompt_lens, output_lens)

    def cut(p: int, o: int, s: float) -> tuple[int, int]:
        return max(1, math.floor(p * s)), max(1, math.floor(o * s))

    prompts: list[int] = []
    outputs: list[int] = []
    clipped = 0
    for p0, o0 in zip(prompt_lens, output_lens, strict=True):
        p, o = cut(p0, o0, scale)
        if p + o > max_model_len:
            clipped += 1
            p, o = cut(p0, o0, max_model_len / (p0 + o0))
        prompts.append(p)
        outputs.append(o)
    return FittedLengths(prompts, outputs, scale, clipped)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: sent at ``arrival_s`` (from the start of the run)
    with a ``prompt_len``-token prompt, generating exactly ``output_len`` tokens."""

    index: int
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order, and how they were made (for the report): the
    dataset ``source``, the ``arrival`` process, its mean ``rate`` (req/s) and ``cv``
    (for ``trace``: the measured CV of the window's gaps), the length ``scale`` and how
    many requests were ``clipped`` beyond it (see ``fit_lengths``)."""

    requests: list[RequestSpec]
    source: str
    arrival: str
    rate: float
    cv: float
    scale: float
    clipped: int
    max_model_len: int
    seed: int

    @property
    def duration_s(self) -> float:
        """Time of the last arrival."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description (no per-request rows)."""
        meta = {k: v for k, v in asdict(self).items() if k != "requests"}
        n = len(self.requests)
        meta |= {
            "num_requests": n,
            "duration_s": self.duration_s,
            "mean_prompt_len": sum(r.prompt_len for r in self.requests) / max(n, 1),
            "mean_output_len": sum(r.output_len for r in self.requests) / max(n, 1),
        }
        return meta


def make_workload(
    dataset: str | Trace,
    num_requests: int,
    rate: float,
    max_model_len: int,
    *,
    arrival: str = "poisson",
    cv: float = 1.0,
    seed: int = 0,
    offset: int = 0,
    quantile: float = 1.0,
    synthetic: SyntheticLengths | None = None,
) -> Workload:
    """``num_requests`` requests at mean ``rate`` req/s with lengths fitted to
    ``max_model_len`` by one scale computed over the whole dataset (so the length mix
    is the same whatever ``num_requests`` and ``seed``; see ``length_scale``).

    ``arrival``: ``poisson``, ``gamma`` (with ``cv``) or ``trace`` (the dataset's
    timestamps from row ``offset`` on, scaled to ``rate``). For Poisson and gamma the
    lengths are a seeded sample of the dataset's rows (without replacement when it has
    enough); for ``trace`` they are the consecutive rows that go with the timestamps.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival process {arrival!r}; choose from {ARRIVALS}")
    trace = (
        dataset
        if isinstance(dataset, Trace)
        else load_dataset(dataset, num_requests, seed, synthetic or SyntheticLengths())
    )
    if arrival == "trace":
        if trace.timestamps_s is None:
            raise ValueError(f"dataset {trace.name!r} has no timestamps for arrival='trace'")
        if not 0 <= offset <= len(trace) - num_requests:
            raise ValueError(
                f"offset {offset} + num_requests {num_requests} exceeds the {len(trace)} "
                f"rows of {trace.name!r}"
            )
        rows = list(range(offset, offset + num_requests))
        arrivals = scale_arrivals([trace.timestamps_s[i] for i in rows], rate)
        cv = interarrival_cv(arrivals) if num_requests >= 3 else 0.0
    else:
        rng = np.random.default_rng([seed, 1])
        replace = num_requests > len(trace)
        rows = rng.choice(len(trace), size=num_requests, replace=replace).tolist()
        arrivals = gamma_arrivals(num_requests, rate, 1.0 if arrival == "poisson" else cv, seed)
        if arrival == "poisson":
            cv = 1.0
    scale = length_scale(trace.prompt_lens, trace.output_lens, max_model_len, quantile)
    fitted = fit_lengths(
        [trace.prompt_lens[i] for i in rows],
        [trace.output_lens[i] for i in rows],
        max_model_len,
        scale=scale,
    )
    requests = [
        RequestSpec(i, t, p, o)
        for i, (t, p, o) in enumerate(
            zip(arrivals, fitted.prompt_lens, fitted.output_lens, strict=True)
        )
    ]
    return Workload(
        requests, trace.name, arrival, rate, cv, fitted.scale, fitted.clipped, max_model_len, seed
    )
