"""The command line of the load generator (``python -m bench.loadgen``): one run per
``--rate`` (comma-separated list), or a goodput search with ``--goodput LO,HI``.

Defaults come from the server's ``GetServerInfo``: ``--max-model-len``, the SLOs and the
worker count for per-worker goodput. Writes ``--out`` (JSON: server, workloads,
summaries, goodput, every request record) and beside it ``STEM-slo-scale.png``,
``STEM-phases.png`` and, with several rates, ``STEM-rate.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.loadgen import CLIENTS, prompt_seed, run_workload, server_workers, warm_up
from bench.metrics import SLO, goodput, summarize
from bench.plots import plot_attainment_vs_rate, plot_attainment_vs_scale, plot_phase_breakdown
from bench.traces import SYNTHETIC_DISTS, SyntheticLengths
from bench.workload import ARRIVALS, Workload, make_workload
from router.client import Client

DEFAULT_SCALES = "0.25,0.5,0.75,1,1.5,2,3,4"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed flags (argparse exits with a message on bad ones)."""
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument(
        "--dataset", default="azure-conv", help="azure-conv|azure-code|synthetic|F.jsonl"
    )
    p.add_argument("--rate", type=_floats, default=[1.0], help="req/s; a comma list runs each")
    p.add_argument(
        "--arrival", choices=ARRIVALS, default=None, help="default poisson (gamma if --cv)"
    )
    p.add_argument("--cv", type=float, default=None, help="gamma arrivals' inter-arrival CV")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the server's")
    p.add_argument("--fit-quantile", type=float, default=1.0, help="length quantile to fit")
    p.add_argument("--vocab-size", type=int, required=True, help="prompt ids are below it")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="default: the server's")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="default: the server's")
    p.add_argument("--send-slo", action="store_true", help="send the SLO with each request")
    p.add_argument("--target", type=float, default=0.9, help="attainment target of goodput")
    p.add_argument("--slo-scales", type=_floats, default=_floats(DEFAULT_SCALES))
    p.add_argument("--goodput", type=_floats, default=None, help="LO,HI: binary search")
    p.add_argument("--tol", type=float, default=0.1, help="goodput search tolerance, req/s")
    p.add_argument("--workers", type=int, default=None, help="default: Σ instances·tp·pp")
    p.add_argument("--synthetic-dist", choices=SYNTHETIC_DISTS, default="uniform")
    p.add_argument("--prompt-mean", type=float, default=128.0)
    p.add_argument("--output-mean", type=float, default=32.0)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="unrecorded requests sent first")
    p.add_argument("--client", choices=CLIENTS, default="aio")
    p.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each request")
    p.add_argument("--out", type=Path, default=Path("bench/results/loadgen.json"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.goodput is not None and len(args.goodput) != 2:
        p.error(f"--goodput takes LO,HI, got {args.goodput}")
    return args


def _fmt(stats: dict[str, float | None]) -> str:
    return "  ".join(
        f"{k} {v:8.1f}" if v is not None else f"{k}      n/a" for k, v in stats.items()
    )


def print_run(run: dict[str, Any]) -> None:
    """One run's summary as a few lines."""
    w, s = run["workload"], run["summary"]
    print(
        f"\n== {w['rate']:g} req/s, {w['arrival']} (CV {w['cv']:.2f}), {w['source']}, "
        f"{w['num_requests']} requests, lengths x{w['scale']:.3f} "
        f"(mean prompt {w['mean_prompt_len']:.0f}, output {w['mean_output_len']:.0f}) =="
    )
    print(
        f"ok {s['num_ok']}/{s['num_requests']} {s['statuses']}; SLO attainment "
        f"{s['attainment']:.1%} (TTFT alone {s['ttft_attainment']:.1%}, TPOT alone "
        f"{s['tpot_attainment']:.1%}) at TTFT {s['slo']['ttft_ms']:g} ms, "
        f"TPOT {s['slo']['tpot_ms']:g} ms"
    )
    for key in ("ttft_ms", "tpot_ms", "e2e_ms", "send_lag_ms"):
        print(f"{key:<12}{_fmt(s[key])}")
    phases = "  ".join(
        f"{k.removesuffix('_ms')} {v:.1f}" for k, v in s["phases_ms"].items() if v is not None
    )
    print(f"server phases (mean ms): {phases or 'n/a'}")
    scale = s["min_slo_scale"]
    print(
        f"throughput {s['completed_req_s'] or 0:.2f} req/s, {s['output_tok_s'] or 0:.1f} tok/s; "
        f"tightest SLO scale for {s['target']:.0%}: "
        + (f"{scale:.3f}" if scale is not None else "none")
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    args = parse_args(argv)
    with Client(args.address, timeout_s=30) as client:
        info = client.server_info()
    max_len = args.max_model_len or info.max_model_len
    slo = SLO(
        (args.slo_ttft_ms if args.slo_ttft_ms is not None else info.slo.ttft_ms) / 1e3,
        (args.slo_tpot_ms if args.slo_tpot_ms is not None else info.slo.tpot_ms) / 1e3,
    )
    workers = args.workers or server_workers(info)
    arrival = args.arrival or ("gamma" if args.cv is not None else "poisson")
    synthetic = SyntheticLengths(
        args.synthetic_dist, args.prompt_mean, args.output_mean, args.spread
    )
    runs: list[dict[str, Any]] = []

    def workload(rate: float) -> Workload:
        return make_workload(
            args.dataset,
            args.num_requests,
            rate,
            max_len,
            arrival=arrival,
            cv=args.cv if args.cv is not None else 1.0,
            seed=args.seed,
            quantile=args.fit_quantile,
            synthetic=synthetic,
        )

    if args.warmup > 0:
        warm_up(args.address, workload(1.0), args.vocab_size, args.warmup, args.seed)

    def measure(rate: float) -> float:
        wl = workload(rate)
        records = run_workload(
            args.address,
            wl,
            args.vocab_size,
            # Fresh prompts per run: another run's would hit the prefix cache.
            seed=prompt_seed(args.seed, len(runs)),
            slo=slo if args.send_slo else None,
            client=args.client,
            timeout_s=args.timeout_s,
            progress=not args.no_progress,
        )
        summary = summarize(records, slo, args.target, args.slo_scales)
        run = {"workload": wl.metadata(), "summary": summary}
        print_run(run)
        runs.append({**run, "records": [r.to_json() for r in records]})
        return float(summary["attainment"])

    search = None
    if args.goodput is not None:
        lo, hi = args.goodput
        search = goodput(measure, lo, hi, args.target, args.tol)
        print(
            f"\ngoodput ({search.status}): {search.rate:.3f} req/s, "
            f"{search.per_worker(workers):.3f} req/s per worker ({workers} workers)"
        )
    else:
        for rate in args.rate:
            measure(rate)

    report = {
        "address": args.address,
        "server": {
            "model": info.model,
            "version": info.version,
            "pools": [[p.role, p.num_instances, p.tp, p.pp] for p in info.pools],
            "max_model_len": info.max_model_len,
            "router_policy": info.router_policy,
            "transport": info.transport,
        },
        "workers": workers,
        "slo": slo.to_json(),
        "client": args.client,
        "goodput": None
        if search is None
        else {**search.to_json(), "per_worker": search.per_worker(workers)},
        "runs": runs,
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    stem = out.with_suffix("")
    labels = [f"{r['workload']['rate']:g} req/s" for r in runs]
    plot_attainment_vs_scale(
        {lb: r["summary"]["slo_scale"] for lb, r in zip(labels, runs, strict=True)},
        Path(f"{stem}-slo-scale.png"),
        args.target,
    )
    plot_phase_breakdown(
        {lb: r["summary"]["phases_ms"] for lb, r in zip(labels, runs, strict=True)},
        Path(f"{stem}-phases.png"),
    )
    pngs = ["slo-scale", "phases"]
    if len(runs) > 1:
        points = sorted((r["workload"]["rate"], r["summary"]["attainment"]) for r in runs)
        plot_attainment_vs_rate(
            {info.model.split("/")[-1] or "pdserve": points}, Path(f"{stem}-rate.png"), args.target
        )
        pngs.append("rate")
    print(f"\nwrote {out} and {', '.join(f'{stem.name}-{p}.png' for p in pngs)}")
    return 0
