"""Goodput of a deployment by simulation (``bench.sim``), and of a prefill pool alone.

- ``deployment_goodput``: P prefill and D decode instances, KV moved at a bandwidth;
  binary search (``bench.metrics.goodput``) for the highest Poisson rate at which the
  ``target`` share of requests meets both SLOs; TTFT and TPOT p95 at that rate.
- ``prefill_goodput``: a prefill pool alone (DistServe's ``simu_prefill``): the
  prompts with one output token each, TTFT counted only.

Every simulation of a search runs the same seeded requests, so attainment falls with
the rate and the binary search is sound. Rates above ``cap`` (the deployment's
steady-state capacity, ``bench/planner/bounds.py``) count as missed without
simulating: a trace of a few hundred requests cannot show decode overload, since a
request waiting for a decode slot is late by the wait spread over all its tokens (a
TPOT SLO of 0.1 s over 30 ms steps absorbs seconds of backlog per request until the
trace ends). Decode alone is therefore not simulated at all: its steady state is the
batch the TPOT SLO and the KV allow (``decode_bound``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.metrics import SLO, GoodputResult, RequestRecord, attainment, goodput, percentile
from bench.planner.sizing import PlanSpec, SizedLayout
from bench.sim import PoolSpec, SimConfig, SimRequest, SimResult, poisson_trace, simulate
from engine.layout import kv_bytes_per_token
from router.bandwidth import Bandwidth
from router.latency_model import LatencyModel
from router.step_fit import Coefficients

NO_LIMIT_S = 1e9  # an SLO that always holds (the phase not being measured)
SEARCH_LO = 1 / 32  # the search spans [estimate / 32, estimate × SEARCH_HI]
SEARCH_HI = 1.5
SEARCH_TOL = 0.02  # stop when the bracket is narrower than 2% of its top
SEARCH_GROW = 3  # times the bracket may double when even its top meets the target
_INSTANT = Coefficients(1e-9, 0.0, 0.0)
_HUGE = 1 << 22  # blocks, sequences and tokens of an instance that never limits


@dataclass(frozen=True)
class Evaluation:
    """A searched goodput (req/s) and, at that rate, the attainment and the p95 TTFT
    and TPOT (seconds; None when nothing finished)."""

    search: GoodputResult
    attainment: float
    ttft_p95_s: float | None
    tpot_p95_s: float | None

    @property
    def rate(self) -> float:
        """The goodput, req/s."""
        return self.search.rate


def _instant_pool() -> PoolSpec:
    """A pool whose steps take no time and whose limits never bind."""
    return PoolSpec(1, LatencyModel(_INSTANT, _INSTANT), _HUGE, 16, _HUGE, _HUGE)


def _record(r: SimRequest) -> RequestRecord:
    """A simulated request as ``bench.metrics`` reads one."""
    return RequestRecord(
        r.index,
        r.arrival_s,
        r.first_token_s,
        r.token_times,
        r.finish_s,
        r.status,
        r.prompt_len,
        r.output_len,
    )


def _p95(values: Sequence[float | None]) -> float | None:
    done = [v for v in values if v is not None]
    return percentile(done, 95.0) if done else None


class Simulator:
    """Runs ``spec``'s requests on deployments; ``runs`` counts simulations."""

    def __init__(self, spec: PlanSpec):
        self.spec = spec
        self.kv_bytes = float(kv_bytes_per_token(spec.cfg, spec.dtype, 1))
        outputs = [o for _, o in spec.lengths]
        self.expected_output_len = max(1, round(sum(outputs) / len(outputs)))
        self.runs = 0

    def run(
        self,
        prefill: PoolSpec,
        decode: PoolSpec,
        bandwidth: float | Bandwidth,
        rate: float,
        lengths: Sequence[tuple[int, int]],
        policy: str,
    ) -> SimResult:
        """One simulation of ``lengths`` arriving as Poisson at ``rate`` req/s."""
        config = SimConfig(
            prefill=prefill,
            decode=decode,
            kv_bytes_per_token=self.kv_bytes,
            bandwidth=bandwidth,
            policy=policy,
            ttft_s=self.spec.slo.ttft_s,
            tpot_s=self.spec.slo.tpot_s,
            expected_output_len=self.expected_output_len,
        )
        self.runs += 1
        return simulate(poisson_trace(rate, lengths, self.spec.seed), config)

    def search(
        self,
        prefill: PoolSpec,
        decode: PoolSpec,
        bandwidth: float | Bandwidth,
        estimate: float,
        slo: SLO,
        lengths: Sequence[tuple[int, int]],
        policy: str,
        cap: float = math.inf,
    ) -> Evaluation:
        """Goodput searched in ``[estimate · SEARCH_LO, estimate · SEARCH_HI]``, the
        bracket doubled (up to ``SEARCH_GROW`` times) while its top still meets the
        target; rates above ``cap`` miss without a simulation."""
        if not (math.isfinite(estimate) and estimate > 0):
            raise ValueError(f"goodput estimate must be a finite rate > 0, got {estimate!r}")
        results: dict[float, tuple[float, SimResult]] = {}

        def measure(rate: float) -> float:
            if rate > cap:
                return 0.0
            result = self.run(prefill, decode, bandwidth, rate, lengths, policy)
            value = attainment([_record(r) for r in result.requests], slo)
            results[rate] = (value, result)
            return value

        lo, hi = estimate * SEARCH_LO, estimate * SEARCH_HI
        found = goodput(measure, lo, hi, self.spec.target, hi * SEARCH_TOL)
        for _ in range(SEARCH_GROW):
            if found.status != "at_hi":
                break
            lo, hi = hi, 2 * hi
            found = goodput(measure, lo, hi, self.spec.target, hi * SEARCH_TOL)
        if found.rate <= 0:
            return Evaluation(found, found.points[0][1], None, None)
        value, result = results[found.rate]
        reqs = result.requests
        return Evaluation(
            found, value, _p95([r.ttft_s for r in reqs]), _p95([r.tpot_s for r in reqs])
        )

    def deployment_goodput(
        self,
        prefill: SizedLayout,
        num_prefill: int,
        decode: SizedLayout,
        num_decode: int,
        bandwidth: float | Bandwidth,
        estimate: float,
        cap: float = math.inf,
    ) -> Evaluation:
        """Goodput of ``num_prefill`` × ``prefill`` and ``num_decode`` × ``decode``
        instances with KV moved at ``bandwidth`` bytes/s, both SLOs counted, at most
        ``cap``."""
        return self.search(
            prefill.pool(num_prefill),
            decode.pool(num_decode),
            bandwidth,
            estimate,
            self.spec.slo,
            self.spec.lengths,
            self.spec.policy,
            cap,
        )

    def prefill_goodput(self, sized: SizedLayout, count: int, bound: float) -> Evaluation:
        """Goodput of ``count`` prefill instances alone (TTFT only; decode instant), at
        most ``bound`` (their steady-state capacity: a loose TTFT SLO would hide an
        overload until the trace ends, as TPOT hides a decode overload)."""
        lengths = [(p, 1) for p, _ in self.spec.lengths]
        only = SLO(self.spec.slo.ttft_s, NO_LIMIT_S)
        pool, instant = sized.pool(count), _instant_pool()
        bw = float(_HUGE) * 1e9
        return self.search(pool, instant, bw, bound, only, lengths, self.spec.policy, bound)
