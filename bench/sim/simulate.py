"""The discrete-event simulation of a pdserve deployment: ``simulate(trace, config)``.

Requests arrive at their trace times; the router places each one at its arrival
(``bench/sim/routing.py``); instances run their loops (``bench/sim/instances.py``)
with step times from their latency models. The first token is stamped when the
prefill step that computes the prompt's last token ends (the prefill instance streams
it), every later token when its decode step ends. Deterministic: the same trace and
config give the same result (ties run in the order they were scheduled; arrivals at
the same instant as another event run first).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence

import numpy as np

from bench.sim.batcher import SimSeq
from bench.sim.config import PoolSpec, SimConfig
from bench.sim.engine_sim import EngineSim
from bench.sim.events import EventQueue
from bench.sim.prefill_sim import PrefillSim
from bench.sim.records import SimRequest, SimResult, TraceRow
from bench.sim.routing import SimRouter


def simulate(trace: Sequence[TraceRow], config: SimConfig) -> SimResult:
    """Runs every request of ``trace`` (``(arrival_s, prompt_len, output_len)`` rows,
    any order) to completion on ``config``'s deployment. ValueError naming the first
    bad row, or a request that can never fit an instance's KV cache."""
    return Simulation(trace, config).run()


def poisson_trace(
    rate_rps: float, lengths: Sequence[tuple[int, int]], seed: int = 0
) -> list[TraceRow]:
    """Poisson arrivals at ``rate_rps`` (seeded) for requests of ``lengths``
    ``(prompt_len, output_len)``, in order, the first at its first gap."""
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise ValueError(f"rate_rps must be a finite number > 0, got {rate_rps!r}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_rps, len(lengths))
    times = np.cumsum(gaps).tolist()
    return [(t, p, o) for t, (p, o) in zip(times, lengths, strict=True)]


class Simulation:
    """One run: builds the instances and the router, then replays the trace."""

    def __init__(self, trace: Sequence[TraceRow], config: SimConfig):
        self.config = config
        self.records = [_record(i, row, config) for i, row in enumerate(trace)]
        self.queue = EventQueue()
        bw, overhead = config.bandwidth_object(), config.transfer_overhead_s

        def transfer_time(p_id: str, d_id: str, nbytes: float) -> float:
            return overhead + (nbytes / bw.between(p_id, d_id) if nbytes else 0.0)

        role, pool = (
            ("colocated", config.colocated) if config.colocated else ("decode", config.decode)
        )
        assert pool is not None
        self.decode = [
            EngineSim(
                f"{role}-{i}",
                pool,
                self.queue,
                config.kv_bytes_per_token,
                transfer_time,
            )
            for i in range(pool.count)
        ]
        self.prefill: list[PrefillSim] = []
        if config.prefill is not None:
            sf = config.prefill_policy == "shortest_first"
            self.prefill = [
                PrefillSim(
                    f"prefill-{i}",
                    config.prefill,
                    self.queue,
                    config.lease_s,
                    sf,
                    self._handoff,
                    self._first_only,
                )
                for i in range(config.prefill.count)
            ]
        for d in self.decode:  # one shared list each way: no copy per instance
            d.neighbours = self.prefill
        for pf in self.prefill:
            pf.neighbours = self.decode
        self.router = SimRouter(config, self.prefill, self.decode)
        self._dest: dict[int, EngineSim] = {}  # rid -> decode instance, while prefilling

    def run(self) -> SimResult:
        """Replays the trace; the result holds the requests in input order."""
        # The run makes millions of small objects and no cycles: the cyclic garbage
        # collector would only rescan them over and over.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if enabled:
                gc.enable()

    def _run(self) -> SimResult:
        t0 = time.perf_counter()
        order = sorted(range(len(self.records)), key=lambda i: self.records[i].arrival_s)
        queue, records = self.queue, self.records
        i, n = 0, len(order)
        while True:
            t_next = queue.next_time()
            if i < n and (t_next is None or records[order[i]].arrival_s <= t_next):
                rec = records[order[i]]
                queue.now = rec.arrival_s
                self._arrive(rec)
                i += 1
            elif t_next is None:
                break
            else:
                queue.run_next()
        insts = [*self.prefill, *self.decode]
        return SimResult(
            requests=records,
            instances=[inst.stats for inst in insts],
            sim_end_s=max((r.finish_s or r.arrival_s for r in records), default=0.0),
            wall_s=time.perf_counter() - t0,
            num_events=queue.popped + n,
        )

    def _arrive(self, rec: SimRequest) -> None:
        now = rec.arrival_s
        pair = self.router.route(rec.prompt_len, rec.output_len)
        if pair is None:
            rec.status = "rejected"
            return
        p, d = pair
        rec.decode_id = d.instance_id
        seq = SimSeq(rec)
        if p is None:
            d.add(seq, now)
            return
        rec.prefill_id = p.instance_id
        self._dest[rec.index] = d
        d.routed[0] += 1
        d.routed[1] += rec.prompt_len
        p.add(seq, now)

    def _leave_prefill(self, rid: int, prompt_len: int) -> EngineSim:
        d = self._dest.pop(rid)
        d.routed[0] -= 1
        d.routed[1] -= prompt_len
        return d

    def _handoff(self, seq: SimSeq, source: PrefillSim, now: float) -> None:
        d = self._leave_prefill(seq.rid, seq.prompt_len)
        d.add_handoff(SimSeq(seq.rec, num_out=1), source, now)

    def _first_only(self, seq: SimSeq, now: float) -> None:
        self._leave_prefill(seq.rid, seq.prompt_len)


def _record(index: int, row: TraceRow, config: SimConfig) -> SimRequest:
    """The request's record; ValueError unless its row is sound and it fits."""
    try:
        arrival, prompt_len, output_len = row
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"trace row {index}: expected (arrival_s, prompt_len, output_len), got {row!r}"
        ) from e
    if not (isinstance(arrival, int | float) and math.isfinite(arrival) and arrival >= 0):
        raise ValueError(f"trace row {index}: arrival_s must be finite and >= 0, got {arrival!r}")
    for name, value in (("prompt_len", prompt_len), ("output_len", output_len)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"trace row {index}: {name} must be an int >= 1, got {value!r}")
    prompt_len, output_len = int(prompt_len), int(output_len)
    _check_fits(index, "prefill", config.prefill, prompt_len)
    _check_fits(index, "decode", config.decode, prompt_len + output_len)
    _check_fits(index, "colocated", config.colocated, prompt_len + output_len)
    return SimRequest(index, float(arrival), prompt_len, output_len)


def _check_fits(index: int, role: str, pool: PoolSpec | None, tokens: int) -> None:
    if pool is not None and tokens > pool.capacity_tokens:
        raise ValueError(
            f"trace row {index}: {tokens} tokens never fit a {role} instance's KV cache "
            f"({pool.num_blocks} blocks of {pool.block_size} tokens)"
        )
