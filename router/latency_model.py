"""Per-instance step latency model (DistServe, OSDI 2024), plain Python + numpy.

- prefill step seconds = a + b·Σlᵢ + c·Σlᵢ², over the uncached tokens lᵢ of each
  prompt (chunk) in the batch;
- decode step seconds = a + b·(context tokens in the batch) + c·batch_size.

Each phase is a ``StepModel`` (router/step_fit.py): fitted by non-negative least
squares on relative error, anchored on a prior so few or degenerate samples still give
sane coefficients, and refined online from observed steps over a bounded window.
``profiling_plan`` (router/latency_profile.py) says which steps to time at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from router.step_fit import Coefficients, StepModel

# Placeholders until an instance is profiled: ~10 ms per step, 5k prompt tokens/s,
# 2 µs per context token and 0.5 ms per sequence per decode step.
DEFAULT_PREFILL_PRIOR = Coefficients(a=0.01, b=2e-4, c=1e-9)
DEFAULT_DECODE_PRIOR = Coefficients(a=0.01, b=2e-6, c=5e-4)
# Where the prior is asserted: prefill (Σl, Σl²) of single prompts of 64, 512 and 4096
# tokens; decode (context tokens, batch size) of 1×256, 8×1024 and 64×256 tokens.
PREFILL_PRIOR_POINTS = ((64.0, 64.0**2), (512.0, 512.0**2), (4096.0, 4096.0**2))
DECODE_PRIOR_POINTS = ((256.0, 1.0), (8192.0, 8.0), (16384.0, 64.0))


@dataclass(frozen=True)
class PrefillSample:
    """One timed prefill step: the uncached tokens of each prompt (chunk) in it."""

    token_lengths: tuple[int, ...]
    seconds: float

    def __post_init__(self) -> None:
        if any(n < 0 for n in self.token_lengths):
            raise ValueError(f"token_lengths must be >= 0, got {self.token_lengths}")
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"seconds must be finite and >= 0, got {self.seconds!r}")

    def features(self) -> tuple[float, float]:
        """``(Σlᵢ, Σlᵢ²)``."""
        return float(sum(self.token_lengths)), float(sum(n * n for n in self.token_lengths))


@dataclass(frozen=True)
class DecodeSample:
    """One timed decode step: sequences in the batch and their total context tokens."""

    batch_size: int
    context_tokens: int
    seconds: float

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.context_tokens < 0:
            raise ValueError(
                f"need batch_size >= 1 and context_tokens >= 0, got "
                f"{self.batch_size} and {self.context_tokens}"
            )
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"seconds must be finite and >= 0, got {self.seconds!r}")

    def features(self) -> tuple[float, float]:
        """``(context tokens, batch size)``."""
        return float(self.context_tokens), float(self.batch_size)


Sample = PrefillSample | DecodeSample


class LatencyModel:
    """Both phases' step times of one instance. ``fit`` from profiling samples,
    ``observe`` each real step, ``predict_*`` anywhere (a few float operations)."""

    def __init__(
        self,
        prefill_prior: Coefficients = DEFAULT_PREFILL_PRIOR,
        decode_prior: Coefficients = DEFAULT_DECODE_PRIOR,
        *,
        window: int = 256,
        refit_every: int = 16,
        prior_weight: float = 1e-3,
    ):
        options: dict[str, Any] = {
            "window": window,
            "refit_every": refit_every,
            "prior_weight": prior_weight,
        }
        self.prefill = StepModel(prefill_prior, PREFILL_PRIOR_POINTS, **options)
        self.decode = StepModel(decode_prior, DECODE_PRIOR_POINTS, **options)

    def fit(self, samples: Iterable[Sample]) -> None:
        """Fits each phase on its samples (a phase without samples keeps its fit).
        ValueError naming the first bad sample (e.g. a time of 0 s)."""
        rows: dict[type, list[tuple[float, float, float]]] = {PrefillSample: [], DecodeSample: []}
        for sample in samples:
            if not isinstance(sample, PrefillSample | DecodeSample):
                raise ValueError(f"not a PrefillSample or DecodeSample: {sample!r}")
            rows[type(sample)].append((*sample.features(), sample.seconds))
        if rows[PrefillSample]:
            self.prefill.fit(rows[PrefillSample])
        if rows[DecodeSample]:
            self.decode.fit(rows[DecodeSample])

    def observe(self, sample: Sample) -> bool:
        """Adds one observed step to its phase (refit every ``refit_every``); False when
        ignored (a 0 s step)."""
        if isinstance(sample, PrefillSample):
            return self.prefill.observe(*sample.features(), sample.seconds)
        if isinstance(sample, DecodeSample):
            return self.decode.observe(*sample.features(), sample.seconds)
        raise ValueError(f"not a PrefillSample or DecodeSample: {sample!r}")

    def predict_prefill(self, token_lengths: Sequence[int]) -> float:
        """Seconds of one prefill step over prompts of these uncached lengths; 0 for an
        empty batch. ValueError on a negative length."""
        if not token_lengths:
            return 0.0
        if min(token_lengths) < 0:
            raise ValueError(f"token lengths must be >= 0, got {list(token_lengths)}")
        return self.prefill.predict(sum(token_lengths), sum(n * n for n in token_lengths))

    def predict_decode(self, batch_size: int, context_tokens: int) -> float:
        """Seconds of one decode step of ``batch_size`` sequences holding
        ``context_tokens`` in all; 0 for an empty batch."""
        if batch_size < 0 or context_tokens < 0:
            raise ValueError(
                f"batch_size and context_tokens must be >= 0, got {batch_size}, {context_tokens}"
            )
        return self.decode.predict(context_tokens, batch_size) if batch_size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for GetServerInfo: each phase's coefficients, prior, counts and
        mean relative error, plus the refinement settings."""
        p = self.prefill
        return {
            "prefill": p.to_dict(),
            "decode": self.decode.to_dict(),
            "window": p.window,
            "refit_every": p.refit_every,
            "prior_weight": p.prior_weight,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyModel:
        """A model whose fit (and prior) are ``data``'s coefficients (from ``to_dict``);
        ValueError naming a missing or bad field."""
        try:
            phases = {
                name: Coefficients(
                    float(data[name]["a"]), float(data[name]["b"]), float(data[name]["c"])
                )
                for name in ("prefill", "decode")
            }
            options = {k: data[k] for k in ("window", "refit_every", "prior_weight") if k in data}
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad latency model data (missing or bad {e}): {data!r}") from e
        return cls(phases["prefill"], phases["decode"], **options)
