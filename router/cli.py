"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from router import cli_bench, cli_engine, cli_plan, cli_serve

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
