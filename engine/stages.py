"""How pipeline stages split a model's decoder layers (no torch: the planner uses it).

Balanced by default (the first ``num_layers % pp`` stages get one extra layer), or at
explicit boundaries: ``boundaries[i]`` is the first layer of stage ``i + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise


def check_boundaries(boundaries: Sequence[int] | None, pp: int) -> None:
    """ValueError naming ``boundaries`` unless None or ``pp - 1`` strictly increasing
    layer indices >= 1 (the range against the layer count is ``stage_layers``'s check)."""
    if boundaries is None:
        return
    b = list(boundaries)
    if len(b) != pp - 1:
        raise ValueError(
            f"pp_boundaries={tuple(b)} must hold pp-1={pp - 1} layer indices "
            f"(the first layer of stages 1..{pp - 1}), got {len(b)}"
        )
    if b and b[0] < 1:
        raise ValueError(f"pp_boundaries={tuple(b)} must be >= 1 (stage 0 needs a layer)")
    if any(x >= y for x, y in pairwise(b)):
        raise ValueError(
            f"pp_boundaries={tuple(b)} must be strictly increasing (every stage needs a layer)"
        )


def stage_layers(num_layers: int, pp: int, boundaries: Sequence[int] | None = None) -> list[range]:
    """Decoder layers of each pipeline stage: split at ``boundaries`` when given, else
    balanced (the first ``num_layers % pp`` stages get one extra layer). ValueError
    unless 1 <= pp <= num_layers and the boundaries are valid and < num_layers."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pp={pp} must be between 1 and num_hidden_layers={num_layers}")
    if boundaries is not None:
        check_boundaries(boundaries, pp)
        if boundaries and boundaries[-1] >= num_layers:
            raise ValueError(
                f"pp_boundaries={tuple(boundaries)} must be < num_hidden_layers={num_layers} "
                "(the last stage needs a layer)"
            )
        edges = [0, *boundaries, num_layers]
        return [range(edges[i], edges[i + 1]) for i in range(pp)]
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        n = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + n))
        start += n
    return ranges
