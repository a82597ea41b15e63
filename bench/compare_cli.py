"""``pdserve bench compare``: the colocated baselines and the disaggregated deployment
on the same workers, the same requests and the same rates, side by side.

Each system (bench/compare.py) is started as a ``pdserve serve`` subprocess
(bench/harness.py), warmed up, and sent ``--num-requests`` open-loop requests at each
of ``--rates`` (the same arrival times and lengths for every system: one seed). Each
run is read against every ``--slo-tpot-ms`` (with ``--slo-ttft-ms``): one table per
SLO of goodput, per-worker goodput and attainment per rate, then TTFT and TPOT
p50/p90/p99 per rate. Writes ``--out`` (JSON with every record) and one PNG of
attainment vs rate per SLO beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.compare import System, goodput_table, latency_table, slo_label, system_figures
from bench.compare import systems as make_systems
from bench.harness import deployment, load_config, run_rates
from bench.metrics import SLO
from bench.plots import plot_attainment_vs_rate
from bench.workload import make_workload
from engine.model_config import ModelConfig
from router.config import ServeConfig


def positive_floats(text: str) -> list[float]:
    """argparse type: comma-separated numbers, all > 0."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def _pd(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected P:D, e.g. 1:1, got {text!r}") from e
    return p, d


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's flags."""
    p.add_argument("--config", default=None, help="base ServeConfig YAML (pools are replaced)")
    p.add_argument("--model", default=None, help="model directory (default: config's, built-in)")
    p.add_argument("--workers", type=int, default=2, help="workers (CPU instances) per system")
    p.add_argument(
        "--rates", type=positive_floats, default=positive_floats("0.5,1,1.5,2,2.5"), help="req/s"
    )
    p.add_argument("--num-requests", type=int, default=60, help="requests per rate")
    p.add_argument("--dataset", default="azure-conv", help="azure-conv|azure-code|synthetic|F")
    p.add_argument(
        "--fit-quantile",
        type=float,
        default=0.99,
        help="lengths are scaled so this quantile of requests fits the model (the rest cut)",
    )
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument(
        "--slo-tpot-ms",
        type=positive_floats,
        default=positive_floats("100,200"),
        help="tight,loose",
    )
    p.add_argument("--pd", type=_pd, default=None, help="P:D of the disaggregated system")
    p.add_argument("--chunk-size", type=int, default=512, help="chunked prefill token budget")
    p.add_argument("--transport", default="local", help="KV transport of the disaggregated one")
    p.add_argument("--policy", default="slo_aware", help="router policy (all systems)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    p.add_argument("--target", type=float, default=0.9, help="attainment target of goodput")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4, help="unrecorded requests sent first")
    p.add_argument("--planner-requests", type=int, default=300, help="per planner simulation")
    p.add_argument("--out", type=Path, default=Path("bench/results/compare.json"))
    p.add_argument("--no-progress", action="store_true")


def base_config(args: argparse.Namespace) -> ServeConfig:
    """The settings every system shares (model, dtype, threads, SLO, router, KV): the
    ``--config`` file's (or the defaults) with the flags over them."""
    from router.cli_engine import ensure_builtin_model

    config = load_config(args.config) if args.config else ServeConfig()
    model = args.model or config.model or str(ensure_builtin_model())
    return config.with_overrides(
        **{
            "model": model,
            "slo.ttft_s": args.slo_ttft_ms / 1e3,
            "slo.tpot_s": min(args.slo_tpot_ms) / 1e3,
            "router.policy": args.policy,
            "kv.transport": args.transport,
            "prefill.num_threads": args.threads,
            "decode.num_threads": args.threads,
        }
    )


def planned_pd(args: argparse.Namespace, model: str) -> tuple[tuple[int, int], dict[str, Any]]:
    """P:D from ``--pd`` or from the planner (CPU, measured latency model, tight SLO)."""
    if args.pd is not None:
        return args.pd, {"source": "--pd"}
    from bench.planner.plan import PlanOptions, plan_placements

    options = PlanOptions(
        device="cpu",
        dataset=args.dataset,
        num_requests=args.planner_requests,
        threads=args.threads,
        policy=args.policy,
        seed=args.seed,
    )
    tight = min(args.slo_tpot_ms)
    best = plan_placements(model, args.workers, args.slo_ttft_ms, tight, options)[0]
    c = best.candidate
    why = {"source": "planner", "goodput": best.goodput, "bound_by": best.bound_by}
    return (c.num_prefill, c.num_decode), why


def run_system(
    system: System, args: argparse.Namespace, vocab: int, slo: SLO
) -> dict[float, list[Any]]:
    """Runs ``system`` at every rate; rate -> records."""
    log = args.out.with_name(f"{args.out.stem}-{system.name.replace(':', '_')}.serve.log")
    with deployment(system.config, log_path=log) as dep:
        info = dep.server_info()

        def workload(rate: float) -> Any:
            return make_workload(
                args.dataset,
                args.num_requests,
                rate,
                info.max_model_len,
                seed=args.seed,
                quantile=args.fit_quantile,
            )

        runs = run_rates(
            dep,
            args.rates,
            workload,
            vocab,
            slo,
            warmup=args.warmup,
            seed=args.seed,
            progress=not args.no_progress,
        )
    return {run.workload.rate: run.records for run in runs}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every system; the JSON report."""
    base = base_config(args)
    if base.model is None:
        raise ValueError("no model directory")
    pd, why = planned_pd(args, base.model)
    print(f"disaggregated P:D = {pd[0]}:{pd[1]} ({why['source']})", flush=True)
    vocab = ModelConfig.from_pretrained(base.model).vocab_size
    slos = [SLO(args.slo_ttft_ms / 1e3, t / 1e3) for t in args.slo_tpot_ms]
    figures: dict[str, Any] = {}
    records: dict[str, Any] = {}
    for system in make_systems(base, args.workers, pd, args.chunk_size):
        print(f"\n== {system.name} ({system.workers} workers)", flush=True)
        runs = run_system(system, args, vocab, slos[0])
        figures[system.name] = system_figures(runs, slos, system.workers, args.target)
        records[system.name] = {
            str(rate): [r.to_json() for r in recs] for rate, recs in runs.items()
        }
    return {"pd": list(pd), "pd_choice": why, "figures": figures, "records": records}


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison, prints the tables and writes JSON + PNGs."""
    p = argparse.ArgumentParser(prog="pdserve bench compare", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``main`` on parsed flags (``pdserve bench compare``)."""
    report = compare(args)
    figures = report["figures"]
    slos = [SLO(args.slo_ttft_ms / 1e3, t / 1e3) for t in args.slo_tpot_ms]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, slo in enumerate(slos):
        print(f"\n{slo_label(slo)}: goodput (req/s) and attainment per rate (req/s)")
        print(goodput_table(figures, i))
        series = {name: fig["slos"][i]["attainment"] for name, fig in figures.items()}
        png = args.out.with_name(f"{args.out.stem}-tpot{slo.tpot_s * 1e3:g}ms.png")
        plot_attainment_vs_rate(series, png, args.target, title=slo_label(slo))
    print("\n" + latency_table(figures))
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out} and its PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
