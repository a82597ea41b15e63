"""The simulation clock: a heap of timed callbacks, ties in the order pushed."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Callback = Callable[[float, Any], None]


class EventQueue:
    """Timed callbacks ``fn(now, arg)``; ``pop`` gives the earliest (first pushed on a
    tie), so a run is deterministic."""

    __slots__ = ("_heap", "_seq", "now", "popped")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callback, Any]] = []
        self._seq = 0
        self.now = 0.0
        self.popped = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, t: float, fn: Callback, arg: Any = None) -> None:
        """Runs ``fn(t, arg)`` at simulated time ``t`` (not before ``now``)."""
        if t < self.now:
            raise ValueError(f"event at {t} s is before the clock ({self.now} s)")
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    def next_time(self) -> float | None:
        """When the earliest event is due, or None when empty."""
        return self._heap[0][0] if self._heap else None

    def run_next(self) -> None:
        """Advances the clock to the earliest event and runs it."""
        t, _, fn, arg = heapq.heappop(self._heap)
        self.now = t
        self.popped += 1
        fn(t, arg)
