"""``python -m bench.validate`` (and ``pdserve bench validate``): the simulator against
the real deployment, rate by rate.

Starts the deployment (``--config``, default: the built-in small model, one prefill
and one decode instance) as a subprocess, warms it up, and at each of ``--rates`` sends
``--num-requests`` Poisson requests with ``--dataset`` lengths scaled to the model's
max length. After each run it builds the simulated twin from what the server reports
and what the run measured (``bench.validate.twin``) and simulates the very same
requests ``--sim-replicas`` times (each step's time is drawn from the run's observed ÷
predicted ratios, so the simulated attainment is the mean over the replicas). Prints,
per rate, measured and simulated SLO attainment, their difference in percentage
points, and measured vs simulated TTFT and TPOT p50/p90; writes ``--out``
(JSON: machine load, config, server info, the table, and per run both sides'
summaries, the twin's measurements and models, the load reports and every measured
record) and beside it a PNG of attainment vs rate, measured and simulated.

``--replay FILE`` simulates the runs of an earlier report again (no server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict, ParseDict

from bench.compare_cli import positive_floats
from bench.harness import RunResult, deployment, load_config, run_rates
from bench.metrics import SLO, RequestRecord, summarize
from bench.plots import plot_attainment_vs_rate
from bench.validate import compare, format_table, simulate_twin, twin
from bench.workload import Workload, make_workload
from engine.model_config import ModelConfig
from protos import pdserve_pb2 as pb
from router.cli_engine import ensure_builtin_model
from router.config import ServeConfig

DEFAULT_RATES = "1,2,4,5,6,8"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's flags (shared with ``pdserve bench validate``)."""
    p.add_argument("--config", default=None, help="ServeConfig YAML (default: 1P+1D built-in)")
    p.add_argument(
        "--rates", type=positive_floats, default=positive_floats(DEFAULT_RATES), help="req/s list"
    )
    p.add_argument("--num-requests", type=int, default=100, help="requests per rate")
    p.add_argument("--dataset", default="azure-conv", help="azure-conv|azure-code|synthetic|F")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="default: the config's")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="default: the config's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4, help="unrecorded requests sent first")
    p.add_argument("--out", type=Path, default=Path("bench/results/validate.json"))
    p.add_argument("--replay", type=Path, default=None, help="re-simulate this report's runs")
    p.add_argument("--sim-replicas", type=int, default=16, help="simulations per run, averaged")
    p.add_argument("--no-progress", action="store_true")


def deployment_config(args: argparse.Namespace) -> ServeConfig:
    """The config to validate, its SLOs overridden by the flags and its model resolved
    (the built-in one is written here first if missing)."""
    config = load_config(args.config) if args.config else ServeConfig()
    slo = {
        "slo.ttft_s": None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1e3,
        "slo.tpot_s": None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1e3,
    }
    config = config.with_overrides(**slo)
    if config.model is None:
        config = config.with_overrides(model=str(ensure_builtin_model()))
    return config


def simulate_run(
    config: ServeConfig, info: pb.ServerInfo, run: dict[str, Any], slo: SLO, replicas: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The table row of one measured run (``RunResult.to_json()``) and what its
    simulation used and gave (the summary of its first replica)."""
    records = [RequestRecord.from_json(r) for r in run["records"]]
    load = ParseDict(run["load"], pb.LoadReport(), ignore_unknown_fields=True)
    before = ParseDict(run["load_before"], pb.LoadReport(), ignore_unknown_fields=True)
    sim = twin(config, info, load, records, before)
    simulated = simulate_twin(sim, records, replicas)
    row = compare(run["workload"]["rate"], records, simulated, slo)
    detail = {"twin": sim.to_json(), "simulated_summary": summarize(simulated[0], slo)}
    return row, detail


def conditions() -> dict[str, Any]:
    """What the machine was doing (the measured side depends on it)."""
    return {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg()), "time": time.time()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the deployment at every rate, simulating each run as it ends; the report."""
    config = deployment_config(args)
    slo = SLO(config.slo.ttft_s, config.slo.tpot_s)
    vocab = ModelConfig.from_pretrained(str(config.model)).vocab_size
    report: dict[str, Any] = {"conditions_before": conditions(), "config": asdict(config)}
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    with deployment(config, log_path=args.out.with_suffix(".serve.log")) as dep:
        info = dep.server_info()
        report["server_info"] = MessageToDict(info, preserving_proto_field_name=True)

        def workload(rate: float) -> Workload:
            n, max_len = args.num_requests, info.max_model_len
            return make_workload(args.dataset, n, rate, max_len, seed=args.seed)

        def on_run(result: RunResult) -> None:
            run = result.to_json()
            row, detail = simulate_run(config, info, run, slo, args.sim_replicas)
            rows.append(row)
            load = os.getloadavg()  # the machine's share of the story
            runs.append({**run, **detail, "loadavg": list(load)})
            print("\n" + format_table(rows[-1:]), flush=True)
            print(f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})", flush=True)

        progress = not args.no_progress
        opts = {"warmup": args.warmup, "seed": args.seed, "progress": progress}
        run_rates(dep, args.rates, workload, vocab, slo, on_run=on_run, **opts)
    return report | {"conditions_after": conditions(), "rows": rows, "runs": runs}


def replay(path: Path, replicas: int) -> dict[str, Any]:
    """An earlier report with every run simulated again (the current simulator)."""
    report: dict[str, Any] = json.loads(path.read_text())
    config = ServeConfig.from_dict(report["config"])
    info = ParseDict(report["server_info"], pb.ServerInfo(), ignore_unknown_fields=True)
    slo = SLO(config.slo.ttft_s, config.slo.tpot_s)
    rows = []
    for run in report["runs"]:
        row, detail = simulate_run(config, info, run, slo, replicas)
        rows.append(row)
        run.update(detail)
    return report | {"rows": rows}


def write(report: dict[str, Any], out: Path) -> Path:
    """Writes the JSON report and the attainment-vs-rate PNG beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    rows = report["rows"]
    points = {side: [(r["rate"], r[side]) for r in rows] for side in ("measured", "simulated")}
    title = "SLO attainment: measured vs simulated"
    return plot_attainment_vs_rate(points, out.with_suffix(".png"), title=title)


def run(args: argparse.Namespace) -> int:
    """Runs (or replays) the validation from parsed flags (``add_arguments``), prints
    the table and writes the report; the exit status."""
    report = replay(args.replay, args.sim_replicas) if args.replay else measure(args)
    rows = report["rows"]
    print("\n" + format_table(rows))
    if rows:
        worst = max(abs(r["error_pp"]) for r in rows)
        print(f"\nworst |error| {worst:.1f} pp over {len(rows)} rates")
    png = write(report, args.out)
    print(f"wrote {args.out} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.validate``: parses ``argv`` and runs."""
    p = argparse.ArgumentParser(prog="python -m bench.validate", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
