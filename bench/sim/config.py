"""What a simulation runs: the pools (``PoolSpec``), the KV transfer, the router.

``SimConfig`` is disaggregated (``prefill`` + ``decode`` pools; ``prefill`` may be
None when the policy prefills locally) or colocated (``colocated`` only: instances
that prefill and decode in the same steps). Validated once with ``ValueError``s that
name the bad value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.bandwidth import DEFAULT_BANDWIDTH_BYTES_S, Bandwidth
from router.latency_model import LatencyModel
from router.policies import POLICY_NAMES, Policy


@dataclass(frozen=True)
class PoolSpec:
    """``count`` identical instances of one role: their latency model (step times),
    KV cache (``num_blocks`` blocks of ``block_size`` tokens) and scheduler limits
    (``engine.config.SchedulerConfig``'s). ``step_overhead_s`` is added to every step
    (scheduling and messaging around the forward that the fitted model leaves out).
    ``step_time_ratios``: observed ÷ predicted step times of a real run; when given,
    each step's predicted time is multiplied by one of them drawn at random (from a
    generator seeded with ``seed`` and the instance id, so runs stay deterministic):
    the real steps' spread around the model, which queueing turns into longer waits
    than the mean alone gives. ``contended_step_time_ratios``: the ratios of steps that
    ran while an instance of the other pool was mid-step on the same host (cores and
    memory bandwidth shared); when given, a step that starts while one is mid-step draws
    from these and the others from ``step_time_ratios``. The simulation then treats
    every instance of the other pool as sharing the host (as the one-host validation
    deployment does)."""

    count: int
    latency: LatencyModel
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    step_overhead_s: float = 0.0
    step_time_ratios: tuple[float, ...] = ()
    seed: int = 0
    contended_step_time_ratios: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("count", "num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PoolSpec.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.latency, LatencyModel):
            raise ValueError(f"PoolSpec.latency must be a LatencyModel, got {self.latency!r}")
        _check_nonneg("PoolSpec.step_overhead_s", self.step_overhead_s)
        for name in ("step_time_ratios", "contended_step_time_ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            bad = [r for r in getattr(self, name) if not (math.isfinite(r) and r > 0)]
            if bad:
                raise ValueError(f"PoolSpec.{name} must be finite and > 0, got {bad[0]!r}")

    @property
    def capacity_tokens(self) -> int:
        """Tokens the KV cache of one instance holds."""
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class SimConfig:
    """One deployment to simulate.

    - ``prefill`` / ``decode``: the disaggregated pools; ``colocated``: the pool of a
      colocated deployment (give it alone).
    - ``kv_bytes_per_token``: KV bytes of one token over all layers; a transfer moves
      the prompt's whole blocks in ``transfer_overhead_s + bytes / bandwidth``.
    - ``bandwidth``: bytes/s (or a per-pair ``Bandwidth``), for the transfers and,
      unless ``policy_options`` names one, for the policy's predictions.
    - ``policy``: a name from ``router.policies.POLICY_NAMES`` (built fresh per run
      with ``policy_options``) or a ``Policy`` object (its state carries over runs).
      Colocated: ``slo_aware`` routes as local prefill on every instance; the others
      pick instances in turn (``round_robin``) or by fewest requests (``least_loaded``).
    - ``prefill_policy``: ``fcfs`` or ``shortest_first`` (the prefill scheduler's).
    - ``ttft_s`` / ``tpot_s``: the SLOs the router plans for; ``expected_output_len``:
      the router's guess, capped by each request's output length (as max_tokens is).
    - ``lease_s``: how long a prefill instance keeps a prompt's blocks for a decode
      instance; a later pull fails and the decode instance recomputes the prompt.
    """

    prefill: PoolSpec | None = None
    decode: PoolSpec | None = None
    colocated: PoolSpec | None = None
    kv_bytes_per_token: float = 0.0
    bandwidth: float | Bandwidth = DEFAULT_BANDWIDTH_BYTES_S
    transfer_overhead_s: float = 0.0
    policy: str | Policy = "round_robin"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    prefill_policy: str = "fcfs"
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    expected_output_len: int = 128
    lease_s: float = 30.0

    def __post_init__(self) -> None:
        if self.colocated is not None:
            if self.prefill is not None or self.decode is not None:
                raise ValueError("give colocated alone, or prefill and decode, not both kinds")
        elif self.decode is None:
            raise ValueError("need a decode pool (disaggregated) or a colocated pool")
        _check_nonneg("kv_bytes_per_token", self.kv_bytes_per_token)
        _check_nonneg("transfer_overhead_s", self.transfer_overhead_s)
        if not isinstance(self.bandwidth, Bandwidth):
            Bandwidth(self.bandwidth)  # ValueError naming a bad figure
        if isinstance(self.policy, str) and self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r} (known: {', '.join(POLICY_NAMES)})")
        if self.prefill_policy not in ("fcfs", "shortest_first"):
            raise ValueError(
                f"prefill_policy must be fcfs or shortest_first, got {self.prefill_policy!r}"
            )
        for name in ("ttft_s", "tpot_s", "lease_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.expected_output_len < 1:
            raise ValueError(f"expected_output_len must be >= 1, got {self.expected_output_len}")

    @property
    def is_colocated(self) -> bool:
        """True for a colocated deployment."""
        return self.colocated is not None

    @property
    def num_instances(self) -> int:
        """Instances over every pool."""
        pools = (self.prefill, self.decode, self.colocated)
        return sum(p.count for p in pools if p is not None)

    def bandwidth_object(self) -> Bandwidth:
        """``bandwidth`` as a ``Bandwidth``."""
        bw = self.bandwidth
        return bw if isinstance(bw, Bandwidth) else Bandwidth(bw)


def _check_nonneg(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
