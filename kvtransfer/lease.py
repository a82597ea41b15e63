"""Leases on blocks that left an instance (no torch).

A prefill instance keeps a finished prompt's blocks until the decode instance that
pulls them acknowledges (``release``) or the lease runs out (``expire``), so a decode
instance that vanishes can never strand them. A decode instance ``claim``s the lease
before it starts reading, which extends it past the transfer's timeout: the blocks
cannot be reused while they are being read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Lease(Generic[T]):
    """What a lease holds (``item``) and until when (monotonic seconds)."""

    item: T
    deadline: float
    claimed: bool = False


class LeaseTable(Generic[T]):
    """Leases by request id. Single-threaded: its owner serializes calls."""

    def __init__(self, ttl_s: float):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._leases: dict[str, Lease[T]] = {}
        self.num_expired = 0  # over the table's life (a metric)

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._leases

    def grant(self, request_id: str, item: T, now: float) -> float:
        """Holds ``item`` for ``ttl_s`` from ``now``; returns the deadline. ValueError if
        ``request_id`` already holds a lease."""
        if request_id in self._leases:
            raise ValueError(f"request {request_id!r} already holds a lease")
        deadline = now + self.ttl_s
        self._leases[request_id] = Lease(item, deadline)
        return deadline

    def claim(self, request_id: str, now: float, hold_s: float) -> bool:
        """Marks the lease as being read and extends it to at least ``now + hold_s``.
        False when there is no such lease or it has already run out."""
        lease = self._leases.get(request_id)
        if lease is None or lease.deadline <= now:
            return False
        lease.claimed = True
        lease.deadline = max(lease.deadline, now + hold_s)
        return True

    def release(self, request_id: str) -> T | None:
        """Ends the lease (acknowledged, aborted or failed); its item, or None."""
        lease = self._leases.pop(request_id, None)
        return None if lease is None else lease.item

    def expire(self, now: float) -> list[tuple[str, T]]:
        """Ends and returns every lease whose deadline has passed."""
        gone = [rid for rid, lease in self._leases.items() if lease.deadline <= now]
        self.num_expired += len(gone)
        return [(rid, self._leases.pop(rid).item) for rid in gone]

    def items(self) -> list[T]:
        """What every live lease holds."""
        return [lease.item for lease in self._leases.values()]

    def next_deadline(self) -> float | None:
        """The earliest deadline, or None without leases (when to look again)."""
        return min((lease.deadline for lease in self._leases.values()), default=None)
