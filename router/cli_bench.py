"""`pdserve bench ...`: the goodput benchmark's commands (bench/ holds the code).

``bench compare`` runs the colocated baselines and the disaggregated deployment side
by side (bench/compare_cli.py); ``bench validate`` checks the simulator against a
measured deployment rate by rate (bench/validate_cli.py). Their modules are imported
only when a command runs, so the other commands start without them.
"""

from __future__ import annotations

import argparse
from typing import Any

Subparsers = Any  # argparse's _SubParsersAction is private


def add_bench(sub: Subparsers) -> None:
    """Register ``bench`` and its commands on the top-level subparsers."""
    from bench import compare_cli, validate_cli

    p = sub.add_parser("bench", help="goodput benchmark: compare systems, validate the simulator")
    commands = p.add_subparsers(dest="bench_command", required=True)
    compare = commands.add_parser(
        "compare",
        help="colocated vs disaggregated on the same workers and requests",
        description=compare_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare_cli.add_arguments(compare)
    compare.set_defaults(run=compare_cli.run)
    validate = commands.add_parser(
        "validate",
        help="simulated vs measured SLO attainment, rate by rate",
        description=validate_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate_cli.add_arguments(validate)
    validate.set_defaults(run=validate_cli.run)
