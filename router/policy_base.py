"""The base of every routing policy (no torch): options, transfer accounting and
predicted-latency ``Decision``s. The policies are in router/policies.py.

KV transfer time (the prompt's KV bytes the decode instance lacks ÷ the pair's
bandwidth) counts in TTFT by default (``transfer_in="ttft"``, conservative). In pdserve
the first token streams from the prefill instance, so the transfer really delays the
second token: ``"tpot"`` spreads it over the expected output instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from router.bandwidth import Bandwidth
from router.policy_views import Decision, DecodeView, PrefillView, RouteRequest

ON_SLO_MISS = ("serve", "reject")
TRANSFER_IN = ("ttft", "tpot")


class Policy(ABC):
    """A routing policy. ``bandwidth``: a ``Bandwidth``, or bytes/s for every pair
    (None: the default measured figure). ``on_slo_miss``: "serve" or "reject".
    ``transfer_in``: "ttft" or "tpot" (where transfer time is counted)."""

    name: ClassVar[str]

    def __init__(
        self,
        *,
        bandwidth: Bandwidth | float | None = None,
        on_slo_miss: str = "serve",
        transfer_in: str = "ttft",
    ) -> None:
        if on_slo_miss not in ON_SLO_MISS:
            raise ValueError(f"on_slo_miss must be one of {ON_SLO_MISS}, got {on_slo_miss!r}")
        if transfer_in not in TRANSFER_IN:
            raise ValueError(f"transfer_in must be one of {TRANSFER_IN}, got {transfer_in!r}")
        if bandwidth is None:
            bandwidth = Bandwidth()
        elif not isinstance(bandwidth, Bandwidth):
            bandwidth = Bandwidth(bandwidth)
        self.bandwidth = bandwidth
        self.on_slo_miss = on_slo_miss
        self.transfer_in = transfer_in

    @abstractmethod
    def decide(
        self, request: RouteRequest, prefill: Sequence[PrefillView], decode: Sequence[DecodeView]
    ) -> Decision:
        """The pair for ``request``; ValueError when a pool it needs is empty."""

    @abstractmethod
    def decide_colocated(self, request: RouteRequest, decode: Sequence[DecodeView]) -> Decision:
        """The instance of a colocated deployment (no prefill instances: every
        instance prefills and decodes its own requests) for ``request``: a ``Decision``
        with ``prefill_id`` None whose predicted latency is ``DecodeView.local_prefill``
        of the chosen instance, so admission (``on_slo_miss``) works as in ``decide``.
        ValueError when ``decode`` is empty. The real router (router/routing.py) and
        the simulator (bench/sim/routing.py) both call it."""

    def with_transfer(
        self, request: RouteRequest, ttft: float, tpot: float, transfer_s: float
    ) -> tuple[float, float]:
        """(TTFT, TPOT) with the transfer time counted where ``transfer_in`` says."""
        if self.transfer_in == "ttft":
            return ttft + transfer_s, tpot
        return ttft, tpot + transfer_s / max(1, request.expected_output_len - 1)

    def make_decision(
        self,
        request: RouteRequest,
        ids: tuple[str | None, str],
        latency: tuple[float, float],
        room: bool,
        reason: str,
    ) -> Decision:
        """A ``Decision`` for ``ids`` (prefill, decode) with predicted (TTFT, TPOT):
        it meets the SLOs when both hold and both instances have room now."""
        meets = meets_slo(request, latency, room)
        admit = meets or self.on_slo_miss == "serve"
        return Decision(ids[0], ids[1], latency[0], latency[1], meets, admit, reason)

    def pair_decision(
        self, request: RouteRequest, p: PrefillView, d: DecodeView, reason: str
    ) -> Decision:
        """The decision for a remote pair chosen by a baseline."""
        bandwidth = self.bandwidth.between(p.instance_id, d.instance_id)
        transfer = request.kv_bytes_to(d.instance_id) / bandwidth
        latency = self.with_transfer(request, p.ttft_s(request), d.tpot_s(request), transfer)
        room = p.has_room(request) and d.has_room(request)
        return self.make_decision(request, (p.instance_id, d.instance_id), latency, room, reason)

    def local_decision(self, request: RouteRequest, d: DecodeView, reason: str) -> Decision:
        """The decision for ``d`` prefilling ``request`` itself, chosen by a baseline."""
        latency, room = d.local_prefill(request), d.has_room(request)
        return self.make_decision(request, (None, d.instance_id), latency, room, reason)


def check_colocated(decode: Sequence[DecodeView]) -> None:
    """ValueError when a colocated deployment has no instance."""
    if not decode:
        raise ValueError("need at least one instance in a colocated deployment, got 0")


def check_pools(prefill: Sequence[PrefillView], decode: Sequence[DecodeView]) -> None:
    """ValueError when either pool is empty."""
    if not prefill or not decode:
        raise ValueError(
            f"need at least one instance per pool, got {len(prefill)} prefill and "
            f"{len(decode)} decode"
        )


def meets_slo(request: RouteRequest, latency: tuple[float, float], room: bool) -> bool:
    """Whether predicted (TTFT, TPOT) meet ``request``'s SLOs with room on both sides."""
    return room and latency[0] <= request.ttft_s and latency[1] <= request.tpot_s
