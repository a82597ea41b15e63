"""The deployment's configuration: one frozen dataclass tree, loaded from YAML,
overridable by CLI flags, validated once with ValueErrors that name the bad value.

``ServeConfig(model, prefill, decode, kv, router, slo, server)``. Values found at run
time (KV blocks, eos ids) live in each instance's ``RuntimeInfo``, never here.

``prefill.num_instances: 0`` makes a colocated deployment (``ServeConfig.colocated``,
examples/colocated.yaml): the decode pool's instances prefill and decode every request
themselves (continuous batching; ``decode.chunked_prefill`` on or off gives DistServe's
two colocated baselines), no KV moves and ``kv`` is unused.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config import DTYPES, CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.executor import PLACEMENT_STRATEGIES
from engine.kv_arena import shared_memory_supported
from prefill.scheduler import PREFILL_POLICIES
from router.policies import Policy, make_policy

TRANSPORTS = ("auto", "gloo", "nccl", "grpc", "local")


@dataclass(frozen=True)
class PoolConfig:
    """One role's instances: how many, their layout, batching limits and KV pool.
    ``num_instances`` may be 0 for the prefill pool only (a colocated deployment; the
    decode pool needs at least one, which ``ServeConfig`` checks)."""

    num_instances: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_boundaries: tuple[int, ...] | None = None
    pp_microbatches: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    memory_fraction: float = 0.1
    enable_prefix_caching: bool = True
    num_threads: int = 1
    num_cpus_per_worker: float | None = None
    placement_strategy: str = "STRICT_PACK"
    policy: str = "fcfs"  # prefill queue order (prefill pools only)

    def __post_init__(self) -> None:
        if self.num_instances < 0:
            raise ValueError(f"num_instances must be >= 0, got {self.num_instances}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, "
                f"got {self.placement_strategy!r}"
            )
        if self.policy not in PREFILL_POLICIES:
            raise ValueError(f"policy must be one of {PREFILL_POLICIES}, got {self.policy!r}")
        self.engine_config("model", "auto", "cpu", 16, None)  # validates the rest

    def engine_config(
        self,
        model: str,
        dtype: str,
        device: str,
        block_size: int,
        max_model_len: int | None,
        shared_kv: bool = False,
    ) -> EngineConfig:
        """The ``EngineConfig`` of one instance of this pool (``shared_kv``: its KV pool
        in shared memory, for the local transport's one-copy path)."""
        return EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            num_threads=self.num_threads,
            max_model_len=max_model_len,
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_bytes=self.kv_cache_bytes,
                memory_fraction=self.memory_fraction,
                num_blocks=self.num_blocks,
                enable_prefix_caching=self.enable_prefix_caching,
                shared_memory=shared_kv,
            ),
            scheduler=SchedulerConfig(
                self.max_num_seqs, self.max_num_batched_tokens, self.chunked_prefill
            ),
            parallel=ParallelConfig(
                self.tp, self.pp, self.ep, self.pp_microbatches, self.pp_boundaries
            ),
        )


@dataclass(frozen=True)
class KVTransferConfig:
    """How KV moves from prefill to decode. ``transport`` "auto" is nccl on CUDA; on
    CPU it is local when the Ray cluster has one node as the deployment starts
    (:meth:`ServeConfig.for_cluster`), else gloo. ``bind_host`` is where gRPC KV
    servers and rendezvous listen. ``connect_at_start`` opens every prefill-decode
    worker channel as the pools start (off: each opens at its first transfer)."""

    transport: str = "auto"
    lease_s: float = 30.0
    transfer_timeout_s: float = 30.0
    bind_host: str = "127.0.0.1"
    connect_at_start: bool = True

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        for name in ("lease_s", "transfer_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"kv.{name} must be > 0, got {getattr(self, name)}")

    def resolved_transport(self, device: str) -> str:
        if self.transport != "auto":
            return self.transport
        return "nccl" if device.startswith("cuda") else "gloo"


@dataclass(frozen=True)
class RouterConfig:
    """How each request gets its (prefill, decode) pair (router/policies.py):
    ``policy`` round_robin | least_loaded | slo_aware; ``on_slo_miss`` serve | reject
    (reject: RESOURCE_EXHAUSTED at once when no pair is predicted to meet the SLOs);
    ``local_prefill_max_tokens`` > 0 lets slo_aware prefill a prompt with at most that
    many uncached tokens on the decode instance itself when predicted better (0: off;
    a colocated deployment prefills every prompt where it decodes, whatever this is,
    placed by the policy's ``decide_colocated``);
    ``transfer_in`` where the KV transfer's time counts (ttft | tpot); the latency
    models start from a short profiling run (``profile_at_start``) and are refitted
    every ``latency_refit_every`` steps over the last ``latency_window``."""

    policy: str = "slo_aware"
    on_slo_miss: str = "serve"
    local_prefill_max_tokens: int = 0
    transfer_in: str = "ttft"
    transfer_gbps: float = 0.5  # KV transfer bandwidth assumed until measured
    expected_output_len: int = 128
    latency_window: int = 256
    latency_refit_every: int = 16
    profile_at_start: bool = True
    profile_repeats: int = 2

    def __post_init__(self) -> None:
        self.make_policy()
        for name in ("expected_output_len", "latency_window", "latency_refit_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"router.{name} must be >= 1, got {getattr(self, name)}")
        if self.profile_repeats < 1:
            raise ValueError(f"router.profile_repeats must be >= 1, got {self.profile_repeats}")

    def make_policy(self) -> Policy:
        """The configured policy; ValueError naming a bad policy or option."""
        if self.transfer_gbps <= 0:
            raise ValueError(f"router.transfer_gbps must be > 0, got {self.transfer_gbps}")
        options: dict[str, Any] = {
            "on_slo_miss": self.on_slo_miss,
            "transfer_in": self.transfer_in,
            "bandwidth": self.transfer_gbps * 1e9,
        }
        if self.policy == "slo_aware":
            options["local_prefill_max_tokens"] = self.local_prefill_max_tokens
        elif self.local_prefill_max_tokens:
            raise ValueError("router.local_prefill_max_tokens needs policy slo_aware")
        return make_policy(self.policy, **options)


@dataclass(frozen=True)
class SLOConfig:
    """The deployment's default latency targets (requests may override them)."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"slo.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServerConfig:
    """Where the gRPC frontend listens."""

    host: str = "127.0.0.1"
    port: int = 50051

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"server.port must be in [0, 65536), got {self.port}")


@dataclass(frozen=True)
class ServeConfig:
    """A whole deployment: the model, both pools, the KV transfer, routing, SLOs and
    the server. ``model`` None means the built-in small model (made on first use).
    ``prefill.num_instances`` 0: colocated (see the module doc)."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    max_model_len: int | None = None
    ray_address: str | None = None
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    kv: KVTransferConfig = field(default_factory=KVTransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.decode.num_instances < 1:
            raise ValueError(
                f"decode.num_instances must be >= 1, got {self.decode.num_instances} "
                "(prefill.num_instances 0 makes a colocated deployment)"
            )
        transport = self.kv.resolved_transport(self.device)
        if transport == "nccl" and self.device == "cpu" and not self.colocated:
            raise ValueError("kv.transport 'nccl' needs device 'cuda'; use gloo, grpc or local")
        self.engine_config("prefill")  # validates block size, device, lengths

    @property
    def colocated(self) -> bool:
        """True when there is no prefill instance: the decode instances prefill and
        decode every request themselves, and no KV moves between instances."""
        return self.prefill.num_instances == 0

    def engine_config(self, role: str) -> EngineConfig:
        """The ``EngineConfig`` of one instance of the ``role`` ("prefill"/"decode") pool."""
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        pool = self.prefill if role == "prefill" else self.decode
        model = self.model or "(built-in)"
        # The local transport writes into a decode instance's pool when it is shared.
        shared = (
            role == "decode"
            and self.device == "cpu"
            and not self.colocated
            and self.kv.resolved_transport(self.device) == "local"
            and shared_memory_supported()
        )
        return pool.engine_config(
            model, self.dtype, self.device, self.block_size, self.max_model_len, shared
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        """Builds the tree from plain data (parsed YAML); ValueError naming any unknown
        key or badly typed value."""
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        """Loads a YAML file (see examples/serve.yaml)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def for_cluster(self, num_nodes: int) -> ServeConfig:
        """This config with ``kv.transport: auto`` settled for a Ray cluster of
        ``num_nodes`` alive nodes: on CPU with one node every instance shares the host,
        so ``local`` (decode pools in shared memory: the one-copy path); otherwise
        unchanged (gloo on CPU, nccl on CUDA). An autoscaling cluster that starts with
        one node and places instances on nodes added later needs an explicit transport."""
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if (
            self.kv.transport != "auto"
            or self.device != "cpu"
            or self.colocated
            or num_nodes != 1
            or not shared_memory_supported()
        ):
            return self
        return dataclasses.replace(self, kv=dataclasses.replace(self.kv, transport="local"))

    def with_overrides(self, **overrides: Any) -> ServeConfig:
        """A copy with dotted keys replaced, e.g. ``{"prefill.tp": 2}``; None is ignored."""
        data = dataclasses.asdict(self)
        for key, value in overrides.items():
            if value is None:
                continue
            *path, last = key.split(".")
            node = data
            for part in path:
                node = node[part]
            if last not in node:
                raise ValueError(f"unknown config key {key!r}")
            node[last] = value
        return ServeConfig.from_dict(data)


def _build(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key {where + unknown[0]!r} (known: {sorted(names)})")
    kwargs = {k: _value(hints[k], v, f"{where}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _value(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, where + ".")
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return tuple(int(v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ValueError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
