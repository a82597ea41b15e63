"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

# Set before anything loads numpy (and OpenBLAS with it): see engine/gemv.py. A test
# keeps it equal to engine.gemv.BLAS_ENV; importing that module here would load numpy.
BLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "20"}
for _name, _value in BLAS_ENV.items():
    os.environ.setdefault(_name, _value)

from router import cli_bench, cli_engine, cli_plan, cli_serve  # noqa: E402

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Disaggregated prefill/decode LLM serving."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cli_engine.add_make_model(sub)
    cli_engine.add_generate(sub)
    cli_serve.add_serve(sub)
    cli_serve.add_client(sub)
    cli_plan.add_plan(sub)
    cli_bench.add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except (ValueError, OSError) as e:  # bad input, a missing file, a busy port
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
