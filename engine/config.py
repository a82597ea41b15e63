"""Engine configuration: frozen dataclasses validated on construction.

Values found at run time (number of KV blocks, eos ids) live in ``RuntimeInfo``
(engine/model_runner.py), never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.stages import check_boundaries

if TYPE_CHECKING:
    from engine.model_config import ModelConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and the memory it may take.

    ``kv_cache_bytes`` wins when set; otherwise ``memory_fraction`` of the device's
    free memory (CUDA) or of total RAM (CPU) goes to the cache after weights.
    ``num_blocks`` fixes the count outright (tests use it). ``shared_memory`` (CPU,
    Linux) puts the pool in one shared file (``engine.kv_arena``) so that same-host
    peers write transferred KV straight into it (the ``local`` transport's one copy).
    """

    block_size: int = 16
    kv_cache_bytes: int | None = None
    memory_fraction: float = 0.1
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    shared_memory: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one instance.

    A step holds at most ``max_num_seqs`` sequences and ``max_num_batched_tokens``
    new tokens (prefill chunks + one per decode). With ``chunked_prefill`` off a
    prompt is prefilled whole in one step (and a prompt over the budget runs alone).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """An instance's layout: ``tp`` tensor-parallel ranks (Megatron style), ``ep``
    expert groups sharding MoE experts (engine/expert_parallel.py): within the TP
    group when ep divides tp, else over ep ranks per stage (a multiple of tp: ep/tp
    replicas of the TP group, attention computed redundantly on each). ``pp``
    pipeline stages split the layers
    (``engine.stages.stage_layers``: balanced, or at ``pp_boundaries``, the first
    layer of stages 1..pp-1); a step flows through them as ``pp_microbatches``
    micro-batches (default: pp) so that stages overlap."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_microbatches: int | None = None
    pp_boundaries: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise ValueError(f"pp_microbatches must be >= 1, got {self.pp_microbatches}")
        check_boundaries(self.pp_boundaries, self.pp)  # the layer range: check_model
        if self.tp % self.ep and self.ep % self.tp:
            # engine/expert_parallel.py: within the TP group, or over ep/tp replicas of it.
            raise ValueError(
                f"ep={self.ep} and tp={self.tp}: one must divide the other "
                "(ep divides tp, or ep is a multiple of tp)"
            )

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage: tp, or ep when ep > tp (ep/tp TP replicas)."""
        return max(self.tp, self.ep)

    @property
    def world_size(self) -> int:
        return self.stage_size * self.pp

    @property
    def microbatches(self) -> int:
        """Micro-batches per step: ``pp_microbatches``, or one per stage by default."""
        return self.pp if self.pp_microbatches is None else self.pp_microbatches

    def check_model(self, cfg: ModelConfig) -> None:
        """Raises ValueError when this layout cannot split ``cfg``, saying which would."""
        from engine.expert_parallel import validate_ep
        from engine.layout import validate_layout

        validate_layout(cfg, self.tp, self.pp, self.pp_boundaries)
        validate_ep(cfg, self.tp, self.ep)


@dataclass(frozen=True)
class EngineConfig:
    """Everything one instance needs to run a model."""

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    attention_backend: str = "auto"
    seed: int = 0
    num_threads: int | None = None
    max_model_len: int | None = None
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs where eligible

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.cache.shared_memory and self.device != "cpu":
            raise ValueError(f"cache.shared_memory needs device 'cpu', got {self.device!r}")
