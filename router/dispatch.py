"""Which (prefill, decode) pair serves a request. Round robin for now; the SLO-aware
policies of the router issue plug in here. No torch."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TypeVar

P = TypeVar("P")
D = TypeVar("D")


class RoundRobin:
    """Cycles through the prefill and the decode instances independently."""

    def __init__(self) -> None:
        self._p = itertools.count()
        self._d = itertools.count()

    def pick(self, prefill: Sequence[P], decode: Sequence[D]) -> tuple[P, D]:
        """The next pair; ValueError when a pool is empty."""
        if not prefill or not decode:
            raise ValueError(
                f"need at least one instance per pool, got {len(prefill)} prefill and "
                f"{len(decode)} decode"
            )
        return prefill[next(self._p) % len(prefill)], decode[next(self._d) % len(decode)]
