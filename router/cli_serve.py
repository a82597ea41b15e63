"""``pdserve serve`` (the gRPC server over a disaggregated deployment, or a colocated
one: ``--colocated`` or ``--prefill-instances 0``) and ``pdserve client`` (a
command-line client of it)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from router.cli_engine import Subparsers, ensure_builtin_model
from router.config import TRANSPORTS, ServeConfig
from router.policies import POLICY_NAMES

# flag -> dotted ServeConfig key; a flag left unset keeps the YAML's (or default) value.
_OVERRIDES = {
    "model": "model",
    "dtype": "dtype",
    "device": "device",
    "address": "ray_address",
    "prefill_instances": "prefill.num_instances",
    "prefill_tp": "prefill.tp",
    "prefill_pp": "prefill.pp",
    "decode_instances": "decode.num_instances",
    "decode_tp": "decode.tp",
    "decode_pp": "decode.pp",
    "transport": "kv.transport",
    "policy": "router.policy",
    "host": "server.host",
    "port": "server.port",
}


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve", help="serve the gRPC API over prefill and decode pools (or colocated) on Ray"
    )
    p.add_argument("--config", default=None, help="ServeConfig YAML (see examples/serve.yaml)")
    p.add_argument("--model", default=None, help="model directory (default: built-in small)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None)
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. auto")
    for role in ("prefill", "decode"):
        p.add_argument(f"--{role}-instances", type=int, default=None)
        p.add_argument(f"--{role}-tp", type=int, default=None)
        p.add_argument(f"--{role}-pp", type=int, default=None)
    p.add_argument(
        "--colocated",
        action="store_true",
        help="no prefill instances: the decode instances prefill every request themselves "
        "(the same as --prefill-instances 0)",
    )
    p.add_argument("--transport", choices=TRANSPORTS, default=None)
    p.add_argument("--policy", choices=POLICY_NAMES, default=None)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--host", default=None, help="default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 50051; 0 picks a free port")
    p.add_argument("--drain-s", type=float, default=5.0, help="grace for calls in flight at stop")
    p.set_defaults(run=_serve)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The YAML (or defaults) with the flags that were given on top."""
    base = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    overrides: dict[str, Any] = {key: getattr(args, flag) for flag, key in _OVERRIDES.items()}
    if args.colocated:
        if args.prefill_instances not in (None, 0):
            raise ValueError(
                f"--colocated runs no prefill instance; got --prefill-instances "
                f"{args.prefill_instances}"
            )
        overrides["prefill.num_instances"] = 0
    if args.slo_ttft_ms is not None:
        overrides["slo.ttft_s"] = args.slo_ttft_ms / 1e3
    if args.slo_tpot_ms is not None:
        overrides["slo.tpot_s"] = args.slo_tpot_ms / 1e3
    config = base.with_overrides(**overrides)
    if config.model is None:
        config = config.with_overrides(model=str(ensure_builtin_model()))
    return config


def _serve(args: argparse.Namespace) -> int:
    from router.server import serve

    asyncio.run(serve(serve_config(args), drain_s=args.drain_s))
    return 0


def add_client(sub: Subparsers) -> None:
    p = sub.add_parser("client", help="send one request to a pdserve server")
    p.add_argument("--address", default="127.0.0.1:50051")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-token-ids", help="comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="print text as it arrives")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--timeout-s", type=float, default=None)
    p.set_defaults(run=_client)


def _client(args: argparse.Namespace) -> int:
    import grpc

    from router.cli_engine import parse_token_ids
    from router.client import Client

    prompt = args.prompt if args.prompt is not None else parse_token_ids(args.prompt_token_ids)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    with Client(args.address, args.timeout_s) as client:
        try:
            if args.stream and not args.json:
                for delta in client.stream(prompt, **sampling):
                    print(delta.text, end="", flush=True)
                print()
                return 0
            result = client.generate(prompt, **sampling)
        except grpc.RpcError as e:
            print(f"pdserve client: {e.code().name}: {e.details()}")
            return 1
    print(json.dumps(result.__dict__) if args.json else result.text)
    return 0
