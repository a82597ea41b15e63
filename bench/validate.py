"""Simulator validation: the same requests on the real deployment and in the simulator
(``bench.sim``), compared rate by rate. The command is ``python -m bench.validate``
(``bench/validate_cli.py``); this module holds the pieces, none of which runs a server.

The simulated twin of a run (``twin``) is built from what the real deployment reports
after it (``sim_config``): pool sizes from ``GetServerInfo``; KV blocks, block size, KV
bytes per token and each instance's fitted latency model from ``GetLoad``; scheduler
limits, routing policy, SLOs and leases from the ``ServeConfig``. What the run itself
measured goes in too: the KV transfer bandwidth (the decode instances' transfer
counters over the run), each pool's observed ÷ predicted step times (decode steps that
ran beside a prefill step apart: the two instances share the host) and the client's
lag over the server's TTFT (``bench.sim.calibrate``). The simulator then replays the
run's own requests: same arrival times, prompt and output lengths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bench.metrics import SLO, RequestRecord, attainment, latency_stats, percentile
from bench.sim import PoolSpec, SimConfig, SimResult, TraceRow, calibrate, simulate
from protos import pdserve_pb2 as pb
from router.config import PoolConfig, ServeConfig
from router.latency_model import LatencyModel
from router.step_fit import Coefficients

# Fewer free or contended decode steps than this: one pool of ratios for all of them.
MIN_SPLIT_STEPS = 20
TABLE_LATENCIES = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("tpot_ms", "p50"), ("tpot_ms", "p90"))


def _coefficients(phases: Sequence[pb.StepCoefficients]) -> Coefficients:
    """The instances' fits of one phase, averaged with their sample counts as weights
    (a pool's instances are identical; each fit saw its own steps)."""
    weights = [max(1, p.num_samples) for p in phases]
    total = sum(weights)

    def mean(name: str) -> float:
        return sum(w * getattr(p, name) for w, p in zip(weights, phases, strict=True)) / total

    return Coefficients(mean("a"), mean("b"), mean("c"))


def _instances(load: pb.LoadReport, role: str) -> list[pb.InstanceLoad]:
    return [i for i in load.instances if i.role == role]


def latency_model(instances: Sequence[pb.InstanceLoad]) -> LatencyModel:
    """One pool's latency model from its instances' reported fits; ValueError when an
    instance reports none (a server that predates the field)."""
    if not instances:
        raise ValueError("a pool with no instances in the load report")
    missing = [i.instance_id for i in instances if not i.HasField("decode_model")]
    if missing:
        raise ValueError(f"the load report has no latency model for {missing[0]!r}")
    return LatencyModel(
        _coefficients([i.prefill_model for i in instances]),
        _coefficients([i.decode_model for i in instances]),
    )


def pool_spec(
    pool: PoolConfig,
    count: int,
    instances: Sequence[pb.InstanceLoad],
    step_time_ratios: Sequence[float] = (),
    contended_step_time_ratios: Sequence[float] = (),
) -> PoolSpec:
    """``count`` instances like ``instances`` (KV blocks: the smallest pool reported)
    with ``pool``'s scheduler limits."""
    return PoolSpec(
        count=count,
        latency=latency_model(instances),
        num_blocks=min(i.blocks_total for i in instances),
        block_size=instances[0].block_size or 16,
        max_num_seqs=pool.max_num_seqs,
        max_num_batched_tokens=pool.max_num_batched_tokens,
        chunked_prefill=pool.chunked_prefill,
        step_time_ratios=tuple(step_time_ratios),
        contended_step_time_ratios=tuple(contended_step_time_ratios),
    )


def transfer_bandwidth(
    load: pb.LoadReport, before: pb.LoadReport | None = None
) -> tuple[float, int] | None:
    """(bytes/s, transfers) of the decode instances' KV pulls between two load reports
    (``before`` None: over the server's life); None when nothing moved."""
    prev = {i.instance_id: i for i in before.instances} if before is not None else {}
    nbytes, seconds, count = 0.0, 0.0, 0
    for inst in load.instances:
        old = prev.get(inst.instance_id)
        nbytes += inst.kv_transfer_bytes - (old.kv_transfer_bytes if old else 0)
        seconds += inst.kv_transfer_seconds - (old.kv_transfer_seconds if old else 0.0)
        count += inst.kv_transfers - (old.kv_transfers if old else 0)
    if count <= 0 or nbytes <= 0 or seconds <= 0:
        return None
    return nbytes / seconds, count


def sim_config(
    config: ServeConfig,
    info: pb.ServerInfo,
    load: pb.LoadReport,
    *,
    bandwidth: float | None = None,
    step_time_ratios: Mapping[str, Sequence[float]] | None = None,
) -> SimConfig:
    """The simulated twin of a running deployment (see the module docstring).
    ``bandwidth`` (bytes/s) defaults to the router's assumed ``transfer_gbps``;
    ``step_time_ratios`` by role ("prefill", "decode"; "decode_contended": the
    decode steps that ran beside a prefill step): see ``PoolSpec``. ValueError when
    the reports do not describe a disaggregated deployment with fitted models."""
    ratios = step_time_ratios or {}
    counts = {p.role: p.num_instances for p in info.pools}
    pools: dict[str, PoolSpec] = {}
    for role, pool in (("prefill", config.prefill), ("decode", config.decode)):
        instances = _instances(load, role)
        if counts.get(role, 0) < 1 or not instances:
            raise ValueError(f"the server reports no {role} pool (pools: {counts})")
        contended = ratios.get(f"{role}_contended", ())
        pools[role] = pool_spec(pool, counts[role], instances, ratios.get(role, ()), contended)
    per_token = max(i.kv_bytes_per_token for i in load.instances)
    bw = bandwidth if bandwidth is not None else config.router.transfer_gbps * 1e9
    return SimConfig(
        prefill=pools["prefill"],
        decode=pools["decode"],
        kv_bytes_per_token=float(per_token),
        bandwidth=bw,
        policy=config.router.make_policy(),  # the router's, with its assumed bandwidth
        prefill_policy=config.prefill.policy,
        ttft_s=config.slo.ttft_s,
        tpot_s=config.slo.tpot_s,
        expected_output_len=config.router.expected_output_len,
        lease_s=config.kv.lease_s,
    )


def trace_of(records: Sequence[RequestRecord]) -> list[TraceRow]:
    """The requests of a run as simulator rows: (arrival, prompt, output length)."""
    return [(r.arrival_s, r.prompt_len, r.output_len) for r in records]


def sim_records(result: SimResult, client_lag_s: float = 0.0) -> list[RequestRecord]:
    """The simulated requests as the load generator's records (a rejected one as
    RESOURCE_EXHAUSTED, the status the real server gives it), every token
    ``client_lag_s`` later (what the client sees on top of the server), so that one
    set of metrics (``bench.metrics``) measures both."""
    lag = client_lag_s
    return [
        RequestRecord(
            index=r.index,
            arrival_s=r.arrival_s,
            first_token_s=None if r.first_token_s is None else r.first_token_s + lag,
            token_times=[t + lag for t in r.token_times],
            finish_s=None if r.finish_s is None else r.finish_s + lag,
            status="ok" if r.status == "ok" and r.finish_s is not None else "RESOURCE_EXHAUSTED",
            prompt_len=r.prompt_len,
            output_len=r.output_len,
            sent_s=r.arrival_s,
        )
        for r in result.requests
    ]


@dataclass(frozen=True)
class Twin:
    """The simulated twin of one measured run and the measurements it was built from
    (seconds; bytes/s)."""

    config: SimConfig
    step_time_ratios: dict[str, tuple[float, ...]]
    client_lag_s: float
    bandwidth: float | None

    def to_json(self) -> dict[str, Any]:
        """The measurements (step-time ratios summarized) and the models used."""
        pools = {"prefill": self.config.prefill, "decode": self.config.decode}
        ratios = {
            role: {
                "steps": len(r),
                "mean": sum(r) / len(r) if r else None,
                "p50": percentile(r, 50) if r else None,
                "p90": percentile(r, 90) if r else None,
            }
            for role, r in self.step_time_ratios.items()
        }
        return {
            "step_time_ratios": ratios,
            "client_lag_s": self.client_lag_s,
            "bandwidth_bytes_s": self.bandwidth,
            "kv_bytes_per_token": self.config.kv_bytes_per_token,
            "models": {
                role: (pool.latency.to_dict() if pool is not None else None)
                for role, pool in pools.items()
            },
        }


def twin(
    config: ServeConfig,
    info: pb.ServerInfo,
    load: pb.LoadReport,
    records: Sequence[RequestRecord],
    before: pb.LoadReport | None = None,
) -> Twin:
    """``sim_config`` with what the run measured: the transfer bandwidth between the
    two load reports, and from the records each pool's observed ÷ predicted step
    times and the client's lag (``bench.sim.calibrate``)."""
    sim_config(config, info, load)  # ValueError unless the reports describe one
    models = {role: latency_model(_instances(load, role)) for role in ("prefill", "decode")}
    budget = config.prefill.max_num_batched_tokens
    steps = {
        "prefill": calibrate.prefill_steps(records, models["prefill"], budget),
        "decode": calibrate.decode_steps(records, models["decode"]),
    }
    ratios = {role: calibrate.step_ratios(s) for role, s in steps.items()}
    free, contended = calibrate.split_contended(steps["decode"], records)
    if min(len(free), len(contended)) >= MIN_SPLIT_STEPS:
        ratios["decode"] = calibrate.step_ratios(free)
        ratios["decode_contended"] = calibrate.step_ratios(contended)
    measured = transfer_bandwidth(load, before)
    bandwidth = measured[0] if measured else None
    return Twin(
        sim_config(config, info, load, bandwidth=bandwidth, step_time_ratios=ratios),
        ratios,
        calibrate.client_lag(records),
        bandwidth,
    )


def simulate_twin(
    sim: Twin, records: Sequence[RequestRecord], replicas: int = 1
) -> list[list[RequestRecord]]:
    """The run's requests simulated ``replicas`` times, each with its own seed for the
    step-time draws (once when the twin draws none), as records (``sim_records``)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    cfg, trace = sim.config, trace_of(records)
    draws = any(p is not None and p.step_time_ratios for p in (cfg.prefill, cfg.decode))
    runs = []
    for seed in range(replicas if draws else 1):
        pools = {
            name: replace(pool, seed=seed)
            for name in ("prefill", "decode")
            if (pool := getattr(cfg, name)) is not None
        }
        runs.append(sim_records(simulate(trace, replace(cfg, **pools)), sim.client_lag_s))
    return runs


def compare(
    rate: float,
    measured: Sequence[RequestRecord],
    simulated: Sequence[Sequence[RequestRecord]],
    slo: SLO,
) -> dict[str, Any]:
    """One table row: the measured attainment (a fraction), the simulated one (the
    mean over the replicas, and their range), the difference in percentage points
    (simulated − measured), and TTFT/TPOT percentiles (ms) of both (the simulated ones
    over every replica's requests)."""
    if not simulated or any(len(s) != len(measured) for s in simulated):
        sizes = [len(s) for s in simulated]
        raise ValueError(f"simulated runs of {sizes} requests for {len(measured)} measured")
    each = [attainment(s, slo) for s in simulated]
    got, want = attainment(measured, slo), sum(each) / len(each)
    row: dict[str, Any] = {
        "rate": rate,
        "measured": got,
        "simulated": want,
        "error_pp": 100.0 * (want - got),
        "simulated_range": [min(each), max(each)],
    }
    pooled = [r for s in simulated for r in s]
    for side, records in (("measured", measured), ("simulated", pooled)):
        ok = [r for r in records if r.ok]
        stats = {
            "ttft_ms": latency_stats([t for r in ok if (t := r.ttft_s) is not None]),
            "tpot_ms": latency_stats([t for r in ok if (t := r.tpot_s) is not None]),
        }
        for metric, q in TABLE_LATENCIES:
            row[f"{side}_{metric.removesuffix('_ms')}_{q}_ms"] = stats[metric][q]
    return row


def _ms(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.0f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as fixed-width text: rate, measured and simulated attainment,
    error (pp), the simulated replicas' range, then measured / simulated TTFT and TPOT
    p50 and p90 (ms)."""
    lat = [f"{m.removesuffix('_ms').upper()} {q}" for m, q in TABLE_LATENCIES]
    head = f"{'rate':>6} {'measured':>9} {'simulated':>9} {'error pp':>9} {'sim range':>11}"
    head += "".join(f" {name + ' ms':>15}" for name in lat)
    units = f"{'req/s':>6} {'':>9} {'':>9} {'':>9} {'%':>11}"
    lines = [head, units + f" {'meas / sim':>15}" * len(lat)]
    for row in rows:
        lo, hi = row.get("simulated_range") or (row["simulated"], row["simulated"])
        line = (
            f"{row['rate']:>6g} {100 * row['measured']:>8.1f}% {100 * row['simulated']:>8.1f}% "
            f"{row['error_pp']:>+9.1f} {f'{100 * lo:.0f}-{100 * hi:.0f}':>11}"
        )
        for metric, q in TABLE_LATENCIES:
            key = f"{metric.removesuffix('_ms')}_{q}_ms"
            pair = f"{_ms(row['measured_' + key])} / {_ms(row['simulated_' + key])}"
            line += f" {pair:>15}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    from bench.validate_cli import main

    sys.exit(main())
