"""Conversions between the public API's messages (protos/pdserve.proto) and the
engine's types, with validation that names the bad field. No tensors, no grpc calls."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

from engine.core import Prompt
from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from router.config import ServeConfig
from router.latency_model import LatencyModel
from router.streams import ClusterOutput

VERSION = metadata.version("pdserve")  # the installed distribution's, as pyproject says


class InvalidRequest(ValueError):
    """A request field that fails validation (the message names the field)."""


def sampling_params(msg: pb.SamplingParams, max_tokens_limit: int) -> SamplingParams:
    """The engine's params from the message; InvalidRequest naming the bad field."""
    kwargs: dict[str, Any] = {
        name: getattr(msg, name)
        for name in ("temperature", "top_k", "top_p", "min_p", "seed", "max_tokens", "logprobs")
        if msg.HasField(name)
    }
    max_tokens = kwargs.get("max_tokens", 16)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise InvalidRequest(
            f"sampling.max_tokens must be in [1, {max_tokens_limit}], got {max_tokens}"
        )
    try:
        return SamplingParams(
            **kwargs,
            stop_token_ids=tuple(msg.stop_token_ids),
            stop=tuple(msg.stop),
            ignore_eos=msg.ignore_eos,
        )
    except ValueError as e:
        raise InvalidRequest(f"sampling.{e}") from e


def prompt(msg: pb.GenerateRequest) -> Prompt:
    """The prompt text or token ids; InvalidRequest when missing or empty."""
    kind = msg.WhichOneof("prompt")
    if kind == "text":
        if not msg.text:
            raise InvalidRequest("prompt text is empty")
        return str(msg.text)
    if kind == "token_ids":
        if not msg.token_ids.ids:
            raise InvalidRequest("prompt token_ids is empty")
        return list(msg.token_ids.ids)
    raise InvalidRequest("prompt is missing: set text or token_ids")


def slo(msg: pb.GenerateRequest, config: ServeConfig) -> tuple[float, float]:
    """(ttft_s, tpot_s): the request's SLO over the deployment's defaults."""
    ttft = msg.slo.ttft_ms / 1e3 if msg.slo.HasField("ttft_ms") else config.slo.ttft_s
    tpot = msg.slo.tpot_ms / 1e3 if msg.slo.HasField("tpot_ms") else config.slo.tpot_s
    if ttft <= 0 or tpot <= 0:
        raise InvalidRequest(f"slo must be > 0, got ttft_ms={ttft * 1e3}, tpot_ms={tpot * 1e3}")
    return ttft, tpot


def _ms(t: dict[str, float], end: str, start: str) -> float:
    return (t[end] - t[start]) * 1e3 if end in t and start in t else 0.0


def final_result(update: ClusterOutput) -> pb.FinalResult:
    """The last message of a stream: reason, usage, per-phase timings, instances."""
    out, t = update.output, update.timings
    n = len(out.token_ids)
    tpot = _ms(t, "finished", "first_token") / (n - 1) if n > 1 else 0.0
    transfer = update.transfer
    return pb.FinalResult(
        finish_reason=out.finish_reason or "",
        usage=pb.Usage(
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=n,
            cached_tokens=out.num_cached_tokens,
        ),
        timings=pb.PhaseTimings(
            queue_ms=_ms(t, "prefill_start", "arrived"),
            prefill_ms=_ms(t, "first_token", "prefill_start"),
            transfer_ms=_ms(t, "transfer_end", "first_token"),
            decode_ms=_ms(t, "finished", "decode_start"),
            ttft_ms=_ms(t, "first_token", "arrived"),
            mean_tpot_ms=tpot,
            transfer_bytes=transfer.num_bytes if transfer is not None else 0,
        ),
        prefill_instance=update.prefill_instance,
        decode_instance=update.decode_instance,
        text=out.text,
    )


def server_info(config: ServeConfig, model: str, max_model_len: int) -> pb.ServerInfo:
    """What is deployed. A colocated deployment is one pool of role "colocated" (its
    decode pool) and transport "none": no KV moves."""
    roles = (
        [("colocated", config.decode)]
        if config.colocated
        else [("prefill", config.prefill), ("decode", config.decode)]
    )
    pools = [
        pb.PoolInfo(role=role, num_instances=p.num_instances, tp=p.tp, pp=p.pp) for role, p in roles
    ]
    return pb.ServerInfo(
        model=model,
        version=VERSION,
        pools=pools,
        slo=pb.SLO(ttft_ms=config.slo.ttft_s * 1e3, tpot_ms=config.slo.tpot_s * 1e3),
        transport="none" if config.colocated else config.kv.resolved_transport(config.device),
        router_policy=config.router.policy,
        max_model_len=max_model_len,
    )


def step_coefficients(phase: Mapping[str, Any]) -> pb.StepCoefficients:
    """One phase of ``LatencyModel.to_dict()`` as the API's message."""
    msg = pb.StepCoefficients(
        a=phase["a"],
        b=phase["b"],
        c=phase["c"],
        num_samples=phase["num_observed"],
        window_samples=phase["window_samples"],
    )
    if phase.get("relative_error") is not None:
        msg.relative_error = phase["relative_error"]
    return msg


def _instance_load(name: str, s: Mapping[str, Any], model: LatencyModel | None) -> pb.InstanceLoad:
    msg = pb.InstanceLoad(
        instance_id=name,
        role=name.split("-")[0],
        waiting=s["waiting"],
        running=s["running"],
        blocks_free=s["blocks_free"],
        blocks_used=s["blocks_used"],
        blocks_total=s["blocks_total"],
        leased=s.get("leased", 0),
        pending=s.get("pending", 0),
        block_size=s.get("block_size", 0),
        kv_bytes_per_token=s.get("kv_bytes_per_token", 0),
        kv_transfers=s.get("kv_transfers", 0),
        kv_transfer_bytes=s.get("kv_transfer_bytes", 0),
        kv_transfer_seconds=s.get("kv_transfer_seconds", 0.0),
    )
    if model is not None:
        fitted = model.to_dict()
        msg.prefill_model.CopyFrom(step_coefficients(fitted["prefill"]))
        msg.decode_model.CopyFrom(step_coefficients(fitted["decode"]))
    return msg


def load_report(
    stats: Mapping[str, Mapping[str, Any]], models: Mapping[str, LatencyModel] | None = None
) -> pb.LoadReport:
    """Per instance load from ``Controller.stats()`` (with ``block_size`` and
    ``kv_bytes_per_token`` when the caller adds them), and each instance's latency
    model from ``models`` (``Router.models``; none for an instance not in it)."""
    models = models or {}
    return pb.LoadReport(
        instances=[_instance_load(name, s, models.get(name)) for name, s in stats.items()]
    )
