"""Routing policies: which (prefill, decode) pair serves a request (no torch).

``make_policy(name, **options)`` builds one of ``POLICY_NAMES``. Every policy has
``decide(request, prefill_views, decode_views) -> Decision`` and predicts the chosen
pair's TTFT and TPOT from the instances' latency models, so admission works the same
for all: with ``on_slo_miss="reject"`` a predicted miss comes back ``admit=False``.

``slo_aware`` (router/slo_aware.py, the default) chooses the pair jointly against the
SLOs; ``round_robin`` and ``least_loaded`` are the baselines.

A colocated deployment (no prefill instances) asks ``decide_colocated(request,
decode_views)`` instead: ``round_robin`` takes the instances in turn, ``least_loaded``
the one with the fewest requests (running, queued and routed since its last step),
then the most free blocks, and ``slo_aware`` the best local prefill against the SLOs.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from typing import Any

from router.policy_base import Policy, check_colocated, check_pools
from router.policy_views import Decision, DecodeView, PrefillView, RouteRequest
from router.slo_aware import SloAware

__all__ = ["POLICY_NAMES", "LeastLoaded", "Policy", "RoundRobin", "SloAware", "make_policy"]


class RoundRobin(Policy):
    """Cycles through the prefill and the decode instances independently."""

    name = "round_robin"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._p = itertools.count()
        self._d = itertools.count()

    def decide(
        self, request: RouteRequest, prefill: Sequence[PrefillView], decode: Sequence[DecodeView]
    ) -> Decision:
        """The next pair in turn."""
        check_pools(prefill, decode)
        p = prefill[next(self._p) % len(prefill)]
        d = decode[next(self._d) % len(decode)]
        return self.pair_decision(request, p, d, "round_robin: next in turn")

    def decide_colocated(self, request: RouteRequest, decode: Sequence[DecodeView]) -> Decision:
        """The next instance in turn (the decode pool's own turn, as in ``decide``)."""
        check_colocated(decode)
        d = decode[next(self._d) % len(decode)]
        return self.local_decision(request, d, "round_robin: next in turn (colocated)")


class LeastLoaded(Policy):
    """The prefill instance with the fewest queued prefill tokens (then requests) and
    the decode instance with the smallest batch (with pending handoffs), then the most
    free blocks; ties go to the first listed."""

    name = "least_loaded"

    def decide(
        self, request: RouteRequest, prefill: Sequence[PrefillView], decode: Sequence[DecodeView]
    ) -> Decision:
        """The least loaded instance of each pool."""
        check_pools(prefill, decode)
        p = min(prefill, key=lambda v: (v.queued_prefill_tokens, v.queued_requests))
        d = min(decode, key=lambda v: (v.batch_size + v.pending_handoffs, -v.blocks_free))
        return self.pair_decision(request, p, d, "least_loaded: least queued work / batch")

    def decide_colocated(self, request: RouteRequest, decode: Sequence[DecodeView]) -> Decision:
        """The instance with the fewest requests (running, waiting to be prefilled, or
        routed to it since its view was made), then the most free blocks."""
        check_colocated(decode)
        d = min(
            decode,
            key=lambda v: (v.batch_size + v.waiting_requests + v.pending_handoffs, -v.blocks_free),
        )
        return self.local_decision(request, d, "least_loaded: fewest requests (colocated)")


_CLASSES: dict[str, type[Policy]] = {c.name: c for c in (RoundRobin, LeastLoaded, SloAware)}
POLICY_NAMES = tuple(_CLASSES)


def policy_options(name: str) -> tuple[str, ...]:
    """The keyword options ``make_policy(name, ...)`` accepts; ValueError on a bad name."""
    if name not in _CLASSES:
        raise ValueError(f"unknown routing policy {name!r} (known: {', '.join(POLICY_NAMES)})")
    cls = _CLASSES[name]
    names = {
        param.name
        for klass in (cls, Policy)
        for param in inspect.signature(klass.__init__).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return tuple(sorted(names))


def make_policy(name: str, **options: Any) -> Policy:
    """A policy by name (``POLICY_NAMES``) with keyword options; ValueError naming an
    unknown policy or option, or a bad option value."""
    allowed = policy_options(name)
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"routing policy {name!r} has no option {key!r} (options: {', '.join(allowed)})"
            )
    return _CLASSES[name](**options)
