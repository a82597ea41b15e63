"""Placements the planner weighs: DistServe's two algorithms as enumerations.

A ``Candidate`` is ``num_prefill`` instances of one layout and ``num_decode`` of
another, made of ``replicas`` identical units (traffic split evenly; each unit is
simulated alone at its share of the rate, as DistServe replicates its best unit).

- ``high_affinity`` (Algorithm 1, fast links between nodes): prefill and decode
  layouts are chosen independently (``tp`` inside a node, ``pp`` anywhere, each
  instance's ``tp·pp`` ≤ workers); for each pair the counts that use the ``workers``
  best (the most balanced ``min(P·prefill rate, D·decode rate)``, then the fewest
  workers). KV moves over NVLink inside one node, else over the inter-node link.
- ``low_affinity`` (Algorithm 2, slow links between nodes): KV may only move over
  NVLink, so stage *i* of a prefill instance and stage *i* of its decode instances sit
  in the same node: both phases share ``pp`` (one stage per node), and one node holds
  an "instance segment" of ``Ps`` prefill and ``Ds`` decode stages of ``tp_p`` and
  ``tp_d`` GPUs (``Ps·tp_p + Ds·tp_d`` ≤ GPUs per node). A unit spans ``pp`` nodes;
  the cluster holds ``nodes // pp`` units (whole nodes only: the GPUs of a partial
  node are left out; fewer workers than a node count as one node of that size).

Rates come from ``rate(phase, layout, across_nodes, count)``: req/s of a pool of
``count`` instances of one phase (the bounds of ``bench/planner/bounds.py``, or
phase-alone simulations); 0 rules a layout out. Prefill pools are not linear in their
size (a long prompt delays only the prompts queued on its own instance), so the
counts are searched with the pool's rate, not one instance's times ``count``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bench.planner.devices import Device
from bench.planner.roofline import Layout
from router.bandwidth import Bandwidth

HIGH, LOW, BOTH = "high", "low", "both"
AFFINITIES = (HIGH, LOW)
ALGORITHM = {HIGH: "Alg.1 high-affinity", LOW: "Alg.2 low-affinity", BOTH: "Alg.1 = Alg.2"}
NVLINK, INTERNODE = "nvlink", "inter-node"

# rate(phase, layout, stages_across_nodes, count) -> req/s of count instances
RateFn = Callable[[str, Layout, bool, int], float]
PoolRate = Callable[[int], float]  # count -> req/s


@dataclass(frozen=True)
class Candidate:
    """A deployment to evaluate (see the module doc). ``prefill_across`` /
    ``decode_across``: that phase's pipeline stages sit on different nodes (their
    sends use the inter-node link); ``link``: what the KV transfers use (between
    units, for Algorithm 2); ``estimate``: the balanced rate (req/s)."""

    affinity: str
    prefill: Layout
    num_prefill: int
    decode: Layout
    num_decode: int
    replicas: int
    link: str
    prefill_across: bool
    decode_across: bool
    estimate: float

    @property
    def workers(self) -> int:
        """Workers (GPUs) the deployment uses."""
        return self.num_prefill * self.prefill.workers + self.num_decode * self.decode.workers

    @property
    def unit(self) -> tuple[int, int]:
        """Prefill and decode instances of one unit."""
        return self.num_prefill // self.replicas, self.num_decode // self.replicas

    def key(self) -> tuple[object, ...]:
        """What makes two candidates the same deployment (whatever the algorithm)."""
        return (
            self.prefill,
            self.num_prefill,
            self.decode,
            self.num_decode,
            self.link,
            self.prefill_across,
            self.decode_across,
        )

    def __str__(self) -> str:
        return f"{self.num_prefill}x P {self.prefill} + {self.num_decode}x D {self.decode}"


def transfer_bandwidth(device: Device, cand: Candidate) -> float | Bandwidth:
    """Bytes/s one request's KV moves at: every rank pair moves its share at once over
    its own GPU's link, so a per-GPU one-way rate times the smaller instance's size.
    Algorithm 2 with several units: NVLink inside a unit, the inter-node link between
    units (the router sees the difference and keeps pairs inside a unit)."""
    streams = min(cand.prefill.workers, cand.decode.workers)
    nvlink, internode = device.nvlink_one_way * streams, device.internode_one_way * streams
    if cand.affinity != LOW or cand.replicas == 1:
        return nvlink if cand.link == NVLINK else internode
    unit_p, unit_d = cand.unit
    pp_p, pp_d = cand.prefill.pp, cand.decode.pp
    # The simulator names its instances prefill-{i} / decode-{j}, pp of them (one per
    # micro-batch) for each real instance; unit u holds the real instances u·unit...
    same_unit = {
        (f"prefill-{i}", f"decode-{j}"): nvlink
        for i in range(cand.num_prefill * pp_p)
        for j in range(cand.num_decode * pp_d)
        if i // pp_p // unit_p == j // pp_d // unit_d
    }
    return Bandwidth(internode, per_pair=same_unit)


def _prefill_pool(rate: RateFn, layout: Layout, across: bool, per_slot: int = 1) -> PoolRate:
    """``rate`` of a prefill pool of ``n · per_slot`` instances, as a function of n."""
    return lambda n: rate("prefill", layout, across, n * per_slot)


def _best_counts(
    budget: int, wp: int, wd: int, prefill: PoolRate, decode_rate: float
) -> tuple[int, int, float] | None:
    """``(P, D, rate)`` with ``P·wp + D·wd`` ≤ ``budget`` maximising ``min(prefill(P),
    D·decode_rate)``, then using the fewest workers; None when nothing fits or a rate
    is 0. ``prefill`` is called for growing P only while more prefill can help."""
    if decode_rate <= 0:
        return None
    best: tuple[float, int, int, int] | None = None  # (-rate, workers, P, D)
    for p in range(1, (budget - wd) // wp + 1):
        d_max = (budget - p * wp) // wd
        rp = prefill(p)
        if rp <= 0:
            continue
        d = min(d_max, max(1, math.ceil(rp / decode_rate - 1e-9)))
        rate = min(rp, d * decode_rate)
        key = (-rate, p * wp + d * wd, p, d)
        if best is None or key < best:
            best = key
        if rp >= d_max * decode_rate:
            break  # decode is the limit from here on, and it only shrinks
    return None if best is None else (best[2], best[3], -best[0])


def high_affinity(
    workers: int, device: Device, layouts: Sequence[Layout], rate: RateFn
) -> list[Candidate]:
    """Algorithm 1: for every (prefill layout, decode layout) pair, the best counts."""
    out = []
    for lp in layouts:
        # Instances are packed: stages cross nodes only when one is larger than a node.
        across_p = lp.workers > device.gpus_per_node
        for ld in layouts:
            across_d = ld.workers > device.gpus_per_node
            found = _best_counts(
                workers,
                lp.workers,
                ld.workers,
                _prefill_pool(rate, lp, across_p),
                rate("decode", ld, across_d, 1),
            )
            if found is None:
                continue
            p, d, est = found
            used = p * lp.workers + d * ld.workers
            link = NVLINK if used <= device.gpus_per_node else INTERNODE
            out.append(Candidate(HIGH, lp, p, ld, d, math.gcd(p, d), link, across_p, across_d, est))
    return out


def low_affinity(
    workers: int, device: Device, tps: Sequence[int], max_pp: int, rate: RateFn
) -> list[Candidate]:
    """Algorithm 2: instance segments of ``Ps`` prefill and ``Ds`` decode stages per
    node, ``pp`` nodes per unit, ``nodes // pp`` units."""
    node = min(device.gpus_per_node, workers)
    nodes = workers // node
    out = []
    for pp in range(1, min(nodes, max_pp) + 1):
        units, across = nodes // pp, pp > 1
        for tp_p in (t for t in tps if t < node):
            lp = Layout(tp_p, pp)
            for tp_d in (t for t in tps if t + tp_p <= node):
                ld = Layout(tp_d, pp)
                found = _best_counts(
                    node,
                    tp_p,
                    tp_d,
                    _prefill_pool(rate, lp, across, units),
                    units * rate("decode", ld, across, 1),
                )
                if found is None:
                    continue
                ps, ds, est = found
                p, d = ps * units, ds * units
                out.append(Candidate(LOW, lp, p, ld, d, units, NVLINK, across, across, est))
    return out


def rank_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Best estimate first, then fewer workers; one per deployment, its affinity
    ``both`` when both algorithms found it (e.g. everything inside one node)."""
    kept: dict[tuple[object, ...], Candidate] = {}
    for c in sorted(candidates, key=lambda c: (-c.estimate, c.workers, str(c))):
        first = kept.setdefault(c.key(), c)
        if first.affinity != c.affinity:
            kept[c.key()] = replace(first, affinity=BOTH)
    return list(kept.values())


@dataclass(frozen=True)
class Placement:
    """An evaluated candidate: ``goodput`` (req/s of the whole deployment at the
    attainment target, simulated unit by unit), ``per_worker`` (goodput / workers
    used), and at that rate the ``attainment`` and p95 TTFT / TPOT (seconds).
    ``prefill_capacity`` / ``decode_capacity``: the goodput of the prefill pool alone
    and of the decode pool alone (what bounds which phase); ``max_num_batched_tokens``
    / ``max_num_seqs``: the prefill budget and decode batch cap simulated (deploy with
    them); ``status``: the goodput search's (``found``, ``at_hi``, ``below_lo``)."""

    candidate: Candidate
    bandwidth_bytes_s: float
    goodput: float
    attainment: float
    ttft_p95_s: float | None
    tpot_p95_s: float | None
    prefill_capacity: float
    decode_capacity: float
    max_num_batched_tokens: int
    max_num_seqs: int
    status: str

    @property
    def workers(self) -> int:
        """Workers the deployment uses."""
        return self.candidate.workers

    @property
    def per_worker(self) -> float:
        """Goodput per worker used (DistServe's per-GPU goodput)."""
        return self.goodput / self.workers

    @property
    def bound_by(self) -> str:
        """The phase whose pool sustains less alone: ``prefill`` or ``decode``."""
        return "prefill" if self.prefill_capacity <= self.decode_capacity else "decode"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        c = self.candidate
        return {
            "affinity": c.affinity,
            "algorithm": ALGORITHM[c.affinity],
            "prefill": {"tp": c.prefill.tp, "pp": c.prefill.pp, "count": c.num_prefill},
            "decode": {"tp": c.decode.tp, "pp": c.decode.pp, "count": c.num_decode},
            "replicas": c.replicas,
            "workers": self.workers,
            "kv_link": c.link,
            "prefill_stages_across_nodes": c.prefill_across,
            "decode_stages_across_nodes": c.decode_across,
            "bandwidth_bytes_s": self.bandwidth_bytes_s,
            "goodput_rps": self.goodput,
            "per_worker_rps": self.per_worker,
            "attainment": self.attainment,
            "ttft_p95_s": self.ttft_p95_s,
            "tpot_p95_s": self.tpot_p95_s,
            "prefill_capacity_rps": self.prefill_capacity,
            "decode_capacity_rps": self.decode_capacity,
            "bound_by": self.bound_by,
            "estimate_rps": c.estimate,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "status": self.status,
        }
