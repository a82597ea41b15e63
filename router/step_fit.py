"""One phase's step-time model ``t = a + b·x₁ + c·x₂``, fitted on relative error.

DistServe fits its latency model by least squares on *relative* error: a sample
``(x₁, x₂, t)`` contributes ``((a + b·x₁ + c·x₂) − t) / t = θ·z − 1`` with
``z = (1, x₁, x₂) / t``, so the fit minimises ``‖Zθ − 1‖²`` subject to ``θ ≥ 0``. With
three unknowns the non-negative least squares problem is solved exactly by trying
every support (7 subsets; the best feasible unconstrained solution on a support is the
optimum).

A prior (the default coefficients, or the last ``fit``) enters as weighted
pseudo-samples at a few spread-out points, so one sample, or samples that all sit at
one point, still give sane coefficients: the data decide what they can, the prior the
rest. Online refinement keeps a ring buffer of the last ``window`` rows and refits
every ``refit_every`` observations (O(1) per observation, amortized). No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Every non-empty subset of the three coefficients, as index lists.
_SUPPORTS = [[i for i in range(3) if mask >> i & 1] for mask in range(1, 8)]


@dataclass(frozen=True)
class Coefficients:
    """``t = a + b·x₁ + c·x₂`` seconds; all three finite and non-negative."""

    a: float
    b: float
    c: float

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"coefficient {name} must be finite and >= 0, got {value!r}")

    def predict(self, x1: float, x2: float) -> float:
        """Seconds for features ``(x₁, x₂)``."""
        return self.a + self.b * x1 + self.c * x2

    def to_dict(self) -> dict[str, float]:
        """``{"a": …, "b": …, "c": …}``."""
        return {"a": self.a, "b": self.b, "c": self.c}


def check_features(x1: float, x2: float) -> None:
    """ValueError unless both features are finite and non-negative."""
    if not (math.isfinite(x1) and math.isfinite(x2)) or x1 < 0 or x2 < 0:
        raise ValueError(f"features must be finite and >= 0, got ({x1!r}, {x2!r})")


def nnls3(gram: FloatArray, rhs: FloatArray) -> FloatArray | None:
    """argmin over θ ≥ 0 of ``θᵀGθ − 2hᵀθ`` for a 3×3 Gram matrix; None when no support
    gives a feasible decrease (never the case when ``h[0] > 0``)."""
    scale = np.sqrt(np.diag(gram))
    scale[scale == 0] = 1.0
    g = gram / np.outer(scale, scale)
    h = rhs / scale
    best: FloatArray | None = None
    best_value = 0.0
    for support in _SUPPORTS:
        sub = g[np.ix_(support, support)]
        u = np.linalg.lstsq(sub, h[support], rcond=None)[0]
        if (u < -1e-12).any():
            continue
        theta = np.zeros(3)
        theta[support] = np.maximum(u, 0.0)
        value = float(theta @ g @ theta - 2 * h @ theta)
        if value < best_value - 1e-15:
            best, best_value = theta, value
    return None if best is None else best / scale


class StepModel:
    """``a + b·x₁ + c·x₂`` for one phase, refined online. ``coefficients`` is the current
    fit; ``predict`` is a few float operations."""

    def __init__(
        self,
        prior: Coefficients,
        prior_points: Sequence[tuple[float, float]],
        *,
        window: int = 256,
        refit_every: int = 16,
        prior_weight: float = 0.01,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if refit_every < 1:
            raise ValueError(f"refit_every must be >= 1, got {refit_every}")
        if not math.isfinite(prior_weight) or prior_weight <= 0:
            raise ValueError(f"prior_weight must be finite and > 0, got {prior_weight!r}")
        if len(prior_points) < 3:
            raise ValueError(f"need >= 3 prior points, got {len(prior_points)}")
        for x1, x2 in prior_points:
            check_features(x1, x2)
        self.window = window
        self.refit_every = refit_every
        self.prior_weight = prior_weight
        self.prior_points = tuple((float(x1), float(x2)) for x1, x2 in prior_points)
        self._rows = np.zeros((window, 3))
        self._stored = 0  # rows in the ring buffer (<= window)
        self._next = 0  # where the next row goes
        self._since_fit = 0
        self.num_observed = 0  # rows ever added (fit + observe)
        self.set_prior(prior)

    def set_prior(self, prior: Coefficients) -> None:
        """Anchors later fits on ``prior`` (weighted pseudo-samples at the prior points)
        and makes it the current fit. ValueError if it predicts 0 at a prior point."""
        x = np.array([(1.0, x1, x2) for x1, x2 in self.prior_points])
        t = x @ np.array([prior.a, prior.b, prior.c])
        if (t <= 0).any():
            raise ValueError(f"prior {prior} must predict > 0 s at every prior point")
        z = x / t[:, None]
        self.prior = prior
        self._prior_gram = self.prior_weight * z.T @ z
        self._prior_rhs = self.prior_weight * z.sum(axis=0)
        self.coefficients = prior

    def predict(self, x1: float, x2: float) -> float:
        """Predicted seconds of one step with features ``(x₁, x₂)``."""
        c = self.coefficients
        return c.a + c.b * x1 + c.c * x2

    def fit(self, rows: Sequence[tuple[float, float, float]]) -> Coefficients:
        """Replaces the window with ``rows`` ``(x₁, x₂, seconds)`` (the last ``window`` of
        them), refits, and anchors later refits on the result. ValueError naming the
        first bad row (negative or non-finite features, seconds not > 0)."""
        for i, (x1, x2, seconds) in enumerate(rows):
            check_features(x1, x2)
            if not math.isfinite(seconds) or seconds <= 0:
                raise ValueError(f"sample {i}: seconds must be finite and > 0, got {seconds!r}")
        self._stored = self._next = self._since_fit = 0
        for x1, x2, seconds in rows[-self.window :]:
            self._add(x1, x2, seconds)
        self.num_observed += len(rows)
        fitted = self.refit()
        self.set_prior(fitted)
        return fitted

    def observe(self, x1: float, x2: float, seconds: float) -> bool:
        """Adds one observed step; refits every ``refit_every`` observations. A step of
        0 s (a coarse clock) is ignored (returns False); ValueError for negative or
        non-finite values."""
        check_features(x1, x2)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        if seconds == 0:
            return False
        self._add(x1, x2, seconds)
        self.num_observed += 1
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.refit()
        return True

    def _add(self, x1: float, x2: float, seconds: float) -> None:
        row = self._rows[self._next]
        row[0], row[1], row[2] = 1.0 / seconds, x1 / seconds, x2 / seconds
        self._next = (self._next + 1) % self.window
        self._stored = min(self._stored + 1, self.window)

    def refit(self) -> Coefficients:
        """Refits on the window plus the prior; keeps the old fit if the solve fails."""
        z = self._rows[: self._stored]
        theta = nnls3(self._prior_gram + z.T @ z, self._prior_rhs + z.sum(axis=0))
        self._since_fit = 0
        if theta is not None:
            self.coefficients = Coefficients(float(theta[0]), float(theta[1]), float(theta[2]))
        return self.coefficients

    def relative_error(self) -> float | None:
        """Mean |predicted − observed| / observed over the window; None when empty."""
        if self._stored == 0:
            return None
        c = self.coefficients
        z = self._rows[: self._stored]
        return float(np.abs(z @ np.array([c.a, c.b, c.c]) - 1.0).mean())

    def to_dict(self) -> dict[str, Any]:
        """Coefficients, prior, sample counts and the window's mean relative error."""
        return {
            **self.coefficients.to_dict(),
            "prior": self.prior.to_dict(),
            "num_observed": self.num_observed,
            "window_samples": self._stored,
            "relative_error": self.relative_error(),
        }
