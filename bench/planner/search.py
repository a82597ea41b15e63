"""The placement search: ``Planner(spec).run()``.

1. Size every layout (``tp`` inside a node, ``tp·pp`` ≤ workers): memory filter,
   step times, limits (``bench/planner/sizing.py``), and bound each phase's rate
   cheaply (``bench/planner/bounds.py``).
2. Enumerate Algorithm 1 and/or 2 on those bounds (``bench/planner/placements.py``)
   and shortlist the prefill layouts of every candidate within ``SHORTLIST`` of the
   best (the bounds ignore queueing, which is what separates prefill layouts).
3. Enumerate again with refined rates: the simulated goodput of a shortlisted
   prefill pool alone (DistServe's per-phase simulation) at each size tried
   (queueing behind long prompts depends on it), and the decode bound (its steady
   state: ``bench/planner/evaluate.py`` says why decode is not simulated alone). The
   counts rebalance; keep the best few, at most ``PER_PREFILL_POOL`` per prefill pool
   (the same prefill pool bounds them alike).
4. Simulate each kept deployment whole and binary-search its goodput at the
   attainment target, capped by its pools' steady-state capacity: the placements,
   best first: highest goodput, goodputs within the search's resolution
   (``SEARCH_TOL`` of the best) counting as equal, then the most goodput per worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from bench.planner.bounds import decode_bound, prefill_bound
from bench.planner.evaluate import SEARCH_TOL, Simulator
from bench.planner.placements import (
    AFFINITIES,
    BOTH,
    HIGH,
    LOW,
    Candidate,
    Placement,
    RateFn,
    high_affinity,
    low_affinity,
    rank_candidates,
    transfer_bandwidth,
)
from bench.planner.roofline import Layout
from bench.planner.sizing import PlanSpec, SizedLayout, size_layout
from engine.layout import valid_tp_values

SHORTLIST = 0.5  # prefill layouts of candidates bounded above this share of the best
FINALISTS = 5  # deployments simulated whole (plus the best of each other algorithm)
PER_PREFILL_POOL = 2
# Deeper pipelines are not considered: the driver schedules every micro-batch (a
# fixed cost each), so "throughput x pp" stops holding once pp x that cost nears the
# step's latency, and bubbles grow with pp (DistServe's placements use a few stages).
MAX_PP = 8

PhaseKey = tuple[str, Layout, bool]  # (phase, layout, stages across nodes)


@dataclass
class PlanResult:
    """Placements best first, and how the search of ``spec`` went: the ``layouts``
    considered, the ``rejected`` ones (name -> why), ``simulations`` run, ``wall_s``."""

    spec: PlanSpec
    placements: list[Placement]
    layouts: list[Layout]
    rejected: dict[str, str] = field(default_factory=dict)
    simulations: int = 0
    wall_s: float = 0.0


class Planner:
    """One search over ``spec`` (see the module doc). ``progress``: a tqdm bar."""

    def __init__(self, spec: PlanSpec, progress: bool = False):
        self.spec = spec
        self.sim = Simulator(spec)
        self._sized: dict[tuple[Layout, bool], SizedLayout | str] = {}
        self._bounds: dict[PhaseKey, float] = {}
        self._shortlisted: set[tuple[Layout, bool]] = set()  # prefill layouts
        self._pools: dict[tuple[PhaseKey, int], float] = {}
        self.progress = progress
        self._bar = tqdm(disable=True)  # replaced by a live bar while ``run`` runs

    def layouts(self) -> list[Layout]:
        """Layouts to consider: ``tp`` shards the model and stays inside a node, the
        instance fits the workers; only ``tp = pp = 1`` with a measured model."""
        spec = self.spec
        if spec.measured is not None:
            return [Layout(1, 1)]
        node = min(spec.device.gpus_per_node, spec.workers)
        tps = [t for t in valid_tp_values(spec.cfg) if t <= node]
        return [
            Layout(tp, pp)
            for tp in tps
            for pp in range(1, min(spec.cfg.num_layers, spec.workers // tp, MAX_PP) + 1)
        ]

    def sized(self, layout: Layout, across: bool) -> SizedLayout | None:
        """The sized layout (cached); None when it cannot run the workload."""
        key = (layout, across)
        if key not in self._sized:
            self._sized[key] = size_layout(self.spec, layout, across)
        got = self._sized[key]
        return got if isinstance(got, SizedLayout) else None

    def bound(self, phase: str, layout: Layout, across: bool, count: int) -> float:
        """``count`` instances' cheap rate bound for ``phase`` (0 when it does not fit)."""
        key = (phase, layout, across)
        if key not in self._bounds:
            sized, spec = self.sized(layout, across), self.spec
            if sized is None:
                self._bounds[key] = 0.0
            elif phase == "prefill":
                self._bounds[key] = prefill_bound(sized, spec.lengths, spec.slo, spec.target)
            else:
                self._bounds[key] = decode_bound(sized, spec.lengths, spec.slo)
        return count * self._bounds[key]

    def refined(self, phase: str, layout: Layout, across: bool, count: int) -> float:
        """``count`` instances' phase-alone goodput: a prefill pool of that size
        simulated (once, cached; 0 off the shortlist), the decode bound."""
        if phase == "decode":
            return self.bound(phase, layout, across, count)
        key: PhaseKey = (phase, layout, across)
        if (layout, across) not in self._shortlisted:
            return 0.0
        if (key, count) not in self._pools:
            sized, est = self.sized(layout, across), self.bound(phase, layout, across, count)
            rate = 0.0
            if sized is not None and est > 0:
                self._bar.set_postfix_str(f"prefill {count}x {layout}")
                rate = self.sim.prefill_goodput(sized, count, est).rate
                self._bar.update()
            self._pools[(key, count)] = rate
        return self._pools[(key, count)]

    def _enumerate(self, affinities: Sequence[str], rate: RateFn) -> list[Candidate]:
        spec, layouts = self.spec, self.layouts()
        out: list[Candidate] = []
        if HIGH in affinities:
            out += high_affinity(spec.workers, spec.device, layouts, rate)
        if LOW in affinities:
            tps = sorted({lay.tp for lay in layouts})
            max_pp = max(lay.pp for lay in layouts)
            out += low_affinity(spec.workers, spec.device, tps, max_pp, rate)
        return out

    def _evaluate(self, cand: Candidate) -> Placement:
        prefill = self.sized(cand.prefill, cand.prefill_across)
        decode = self.sized(cand.decode, cand.decode_across)
        if prefill is None or decode is None:
            raise ValueError(f"candidate {cand} uses a layout that does not fit")
        self._bar.set_postfix_str(str(cand))
        bw = transfer_bandwidth(self.spec.device, cand)
        cap = min(
            self.bound("prefill", cand.prefill, cand.prefill_across, cand.num_prefill),
            self.bound("decode", cand.decode, cand.decode_across, cand.num_decode),
        )
        found = self.sim.deployment_goodput(
            prefill, cand.num_prefill, decode, cand.num_decode, bw, cand.estimate, cap
        )
        self._bar.update()
        return Placement(
            cand,
            # Per-pair (Algorithm 2 across units): the figure inside a unit.
            bw if isinstance(bw, float) else max(bw.per_pair.values(), default=bw.default),
            found.rate,
            found.attainment,
            found.ttft_p95_s,
            found.tpot_p95_s,
            self.refined("prefill", cand.prefill, cand.prefill_across, cand.num_prefill),
            self.refined("decode", cand.decode, cand.decode_across, cand.num_decode),
            prefill.max_num_batched_tokens,
            decode.max_num_seqs,
            found.search.status,
        )

    def run(self, affinities: Sequence[str] = AFFINITIES) -> PlanResult:
        """The search (module doc) over the given affinities (``high``, ``low``)."""
        bad = [a for a in affinities if a not in AFFINITIES]
        if bad or not affinities:
            raise ValueError(f"affinities must be among {AFFINITIES}, got {list(affinities)}")
        t0 = time.perf_counter()
        self._bar = tqdm(desc="pdserve plan", unit="search", disable=not self.progress, leave=False)
        try:
            bounded = rank_candidates(self._enumerate(affinities, self.bound))
            top = bounded[0].estimate if bounded else 0.0
            self._shortlisted = {
                (c.prefill, c.prefill_across)
                for c in bounded
                if c.estimate > 0 and c.estimate >= SHORTLIST * top
            }
            ranked = rank_candidates(self._enumerate(affinities, self.refined))
            placements = [self._evaluate(c) for c in _finalists(ranked, affinities)]
        finally:
            self._bar.close()
        placements.sort(key=_rank_key(placements))
        rejected = {
            f"{lay}{' across nodes' if across else ''}": why
            for (lay, across), why in self._sized.items()
            if isinstance(why, str)
        }
        wall = time.perf_counter() - t0
        return PlanResult(self.spec, placements, self.layouts(), rejected, self.sim.runs, wall)


def _rank_key(placements: Sequence[Placement]) -> Callable[[Placement], tuple[float, ...]]:
    """Best first: goodput in steps of the search's resolution below the best (so
    near-ties fall together), then goodput per worker, then fewer workers."""
    best = max((p.goodput for p in placements), default=0.0)
    step = SEARCH_TOL * best or 1.0
    return lambda p: (math.floor((best - p.goodput) / step + 1e-9), -p.per_worker, p.workers)


def _finalists(ranked: Sequence[Candidate], affinities: Sequence[str]) -> list[Candidate]:
    """The ``FINALISTS`` best with an estimate > 0, preferring variety (at most
    ``PER_PREFILL_POOL`` per prefill pool while others remain), plus the best of each
    affinity not among them."""
    ranked = [c for c in ranked if c.estimate > 0]
    out: list[Candidate] = []
    for c in ranked:
        same = sum((o.prefill, o.num_prefill) == (c.prefill, c.num_prefill) for o in out)
        if len(out) < FINALISTS and same < PER_PREFILL_POOL:
            out.append(c)
    out += [c for c in ranked if c not in out][: FINALISTS - len(out)]
    for affinity in affinities:
        if not any(c.affinity in (affinity, BOTH) for c in out):
            out += [c for c in ranked if c.affinity == affinity][:1]
    return out
