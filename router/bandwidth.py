"""KV transfer bandwidth (bytes/s) from each prefill to each decode instance (no torch).

Uniform by default (one measured figure for every pair), so policies can decompose
the (prefill, decode) choice; per-pair figures come from a mapping, a matrix or a
callable, and policies then read a cached seconds-per-byte matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

# bench.kvtransfer on the dev box: gloo between two CPU processes moved a 2048-token
# KV cache (32 MiB) at ~0.58 GB/s; rounded down.
DEFAULT_BANDWIDTH_BYTES_S = 5e8

FloatArray = npt.NDArray[np.float64]


def _check(value: float, where: str) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"bandwidth {where} must be a finite number > 0 bytes/s, got {value!r}")
    return float(value)


class Bandwidth:
    """Bytes/s between prefill and decode instances: ``default`` for every pair unless
    ``per_pair[(prefill_id, decode_id)]`` or ``fn(prefill_id, decode_id)`` (not both)
    says otherwise. Per-pair matrices are cached by the id lists; call ``invalidate``
    after a callable's answers change."""

    def __init__(
        self,
        default: float = DEFAULT_BANDWIDTH_BYTES_S,
        per_pair: Mapping[tuple[str, str], float] | None = None,
        fn: Callable[[str, str], float] | None = None,
    ):
        if per_pair is not None and fn is not None:
            raise ValueError("give per_pair or fn, not both")
        self.default = _check(default, "default")
        self.per_pair = {k: _check(v, f"of pair {k}") for k, v in (per_pair or {}).items()}
        self.fn = fn
        self._key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._matrix: FloatArray = np.zeros((0, 0))

    @classmethod
    def from_matrix(
        cls,
        prefill_ids: Sequence[str],
        decode_ids: Sequence[str],
        matrix: Sequence[Sequence[float]] | FloatArray,
        default: float = DEFAULT_BANDWIDTH_BYTES_S,
    ) -> Bandwidth:
        """Per-pair figures from a ``len(prefill_ids) × len(decode_ids)`` matrix."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (len(prefill_ids), len(decode_ids)):
            raise ValueError(
                f"bandwidth matrix shape {m.shape} != ({len(prefill_ids)}, {len(decode_ids)})"
            )
        pairs = {
            (p, d): float(m[i, j])
            for i, p in enumerate(prefill_ids)
            for j, d in enumerate(decode_ids)
        }
        return cls(default, per_pair=pairs)

    @property
    def is_uniform(self) -> bool:
        """True when every pair has ``default`` (no per-pair figures, no callable)."""
        return self.fn is None and not self.per_pair

    def between(self, prefill_id: str, decode_id: str) -> float:
        """Bytes/s from ``prefill_id`` to ``decode_id``."""
        if self.fn is not None:
            return _check(self.fn(prefill_id, decode_id), f"fn({prefill_id!r}, {decode_id!r})")
        return self.per_pair.get((prefill_id, decode_id), self.default)

    def seconds_per_byte(
        self, prefill_ids: tuple[str, ...], decode_ids: tuple[str, ...]
    ) -> FloatArray:
        """``1 / bandwidth`` as a (prefill × decode) matrix, cached for the last id
        lists asked for (read only)."""
        key = (prefill_ids, decode_ids)
        if key != self._key:
            rows = [[1.0 / self.between(p, d) for d in decode_ids] for p in prefill_ids]
            m = np.array(rows, dtype=np.float64).reshape(len(prefill_ids), len(decode_ids))
            m.setflags(write=False)
            self._key, self._matrix = key, m
        return self._matrix

    def invalidate(self) -> None:
        """Forgets the cached matrix (after the callable's figures change)."""
        self._key = None
