"""One phase's step-time model ``t = a + b·x₁ + c·x₂``, fitted on relative error.

DistServe fits its latency model by least squares on *relative* error: a sample
``(x₁, x₂, t)`` contributes ``((a + b·x₁ + c·x₂) − t) / t = θ·z − 1`` with
``z = (1, x₁, x₂) / t``, so the fit minimises ``‖Zθ − 1‖²`` subject to ``θ ≥ 0``. With
three unknowns the non-negative least squares problem is solved exactly by trying
every support (7 subsets; the best feasible unconstrained solution on a support is the
optimum).

A prior (the default coefficients, or the last ``fit``) enters as weighted
pseudo-samples at a few spread-out points, so badly spread data still extrapolate
sanely; when the window cannot pin down three coefficients at all (one sample, or all
samples on a line) the fit only rescales the prior to the data. Online refinement
keeps a ring buffer of the last ``window`` rows and refits every ``refit_every``
observations (O(1) per observation, amortized). No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Every non-empty subset of the three coefficients, as index lists, largest first.
_SUPPORTS = sorted(
    ([i for i in range(3) if mask >> i & 1] for mask in range(1, 8)), key=len, reverse=True
)


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


def solve_small(a: list[list[float]], b: list[float]) -> list[float] | None:
    """``x`` with ``a·x = b`` for a tiny dense system (Gaussian elimination with partial
    pivoting, pure Python: faster than numpy at this size); None when singular."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= f * m[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def _scaled(gram: FloatArray) -> tuple[list[list[float]], list[float]]:
    """The Jacobi-scaled Gram matrix (unit diagonal) as lists, and the scales."""
    gl: list[list[float]] = gram.tolist()
    scale = [math.sqrt(gl[i][i]) if gl[i][i] > 0 else 1.0 for i in range(3)]
    return [[gl[i][j] / (scale[i] * scale[j]) for j in range(3)] for i in range(3)], scale


def nnls3(gram: FloatArray, rhs: FloatArray) -> list[float] | None:
    """argmin over θ ≥ 0 of ``θᵀGθ − 2hᵀθ`` for a 3×3 Gram matrix; None when no support
    gives a decrease (never the case when ``h[0] > 0``). Solved on the Jacobi-scaled
    system (features differ by orders of magnitude); the full support first, which is
    the answer whenever it is feasible."""
    g, scale = _scaled(gram)
    h = [v / s for v, s in zip(rhs.tolist(), scale, strict=True)]
    best: list[float] | None = None
    best_value = 0.0
    for support in _SUPPORTS:
        u = solve_small([[g[i][j] for j in support] for i in support], [h[i] for i in support])
        if u is None or min(u) < -1e-12:
            continue
        value = -sum(h[i] * max(ui, 0.0) for i, ui in zip(support, u, strict=True))
        if value < best_value - 1e-15:
            best, best_value = [0.0, 0.0, 0.0], value
            for i, ui in zip(support, u, strict=True):
                best[i] = max(ui, 0.0) / scale[i]
            if len(support) == 3:
                break
    return best


def full_rank(gram: FloatArray) -> bool:
    """Whether a 3×3 Gram matrix has rank 3: the determinant of its Jacobi-scaled form
    (1 for orthogonal features, 0 for collinear ones) is not negligible."""
    if min(gram[i, i] for i in range(3)) <= 0:
        return False
    (a, b, c), (_, e, f), (_, _, i) = _scaled(gram)[0]
    return a * (e * i - f * f) - b * (b * i - f * c) + c * (b * f - e * c) > 1e-10


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
        prior_weight: float = 1e-3,
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
        """Refits on the window plus the prior. When the window cannot pin down all
        three coefficients (fewer than three independent points) it only rescales the
        prior to the data; keeps the old fit if the solve fails."""
        self._since_fit = 0
        if self._stored == 0:
            self.coefficients = self.prior
            return self.prior
        z = self._rows[: self._stored]
        gram = z.T @ z
        p = self.prior
        if full_rank(gram):
            theta = nnls3(self._prior_gram + gram, self._prior_rhs + z.sum(axis=0))
            if theta is not None:
                self.coefficients = Coefficients(*theta)
            return self.coefficients
        q = z @ np.array([p.a, p.b, p.c])  # prior / observed, per row
        s = float(q.sum() / (q @ q))
        self.coefficients = Coefficients(p.a * s, p.b * s, p.c * s)
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
