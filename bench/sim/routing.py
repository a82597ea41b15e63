"""The router of ``router/routing.py`` over simulated instances.

Each request becomes a ``RouteRequest``; each instance a ``PrefillView`` /
``DecodeView`` built from its simulated state exactly as ``Router`` builds them (kept
until that instance steps, and updated with ``plus`` after each decision), and the
policy's own ``decide`` picks the pair. The router's latency models are the
instances' own (the fitted model is both the truth and the prediction here). No prefix
caching: ``cached_tokens`` is always empty.

Colocated pools have no prefill instances: the policy's ``decide_colocated`` places
each request, as ``Router.decide`` does for a colocated deployment (router/policies.py:
``slo_aware`` decides among local prefills on every instance, ``round_robin`` takes
instances in turn and ``least_loaded`` the one with the fewest requests, then the most
free blocks, then the first).
"""

from __future__ import annotations

from typing import Any

from bench.sim.config import SimConfig
from bench.sim.engine_sim import EngineSim
from bench.sim.prefill_sim import PrefillSim
from router.policies import Policy, SloAware, make_policy
from router.policy_views import DecodeView, PrefillView, RouteRequest


def build_policy(config: SimConfig) -> Policy:
    """A fresh policy from ``config`` (or its ``Policy`` object as is)."""
    if isinstance(config.policy, Policy):
        return config.policy
    options: dict[str, Any] = dict(config.policy_options)
    options.setdefault("bandwidth", config.bandwidth_object())
    return make_policy(config.policy, **options)


def prefill_view(p: PrefillSim) -> PrefillView:
    """``Router._prefill_view`` of a simulated prefill instance."""
    b = p.batcher
    queued = sum(s.length - s.computed for s in b.waiting)
    queued += sum(s.length - s.computed for s in b.running)
    return PrefillView(
        instance_id=p.instance_id,
        queued_prefill_tokens=queued,
        queued_requests=len(b.waiting) + len(b.running),
        blocks_free=b.free_blocks,
        block_size=b.block_size,
        model=p.model,
        max_num_batched_tokens=b.budget,
    )


def decode_view(d: EngineSim) -> DecodeView:
    """``Router._decode_view`` of a simulated decode (or colocated) instance."""
    b = d.batcher
    return DecodeView(
        instance_id=d.instance_id,
        batch_size=len(b.running),
        context_tokens=sum(s.length for s in b.running),
        pending_handoffs=len(d.pending) + (d.transferring is not None) + d.routed[0],
        blocks_free=b.free_blocks,
        block_size=b.block_size,
        max_num_seqs=b.max_num_seqs,
        model=d.model,
        pending_tokens=sum(s.prompt_len for s, _ in d.pending) + d.routed[1],
        local_prefill_tokens=sum(s.length - s.computed for s in b.waiting),
        waiting_requests=len(b.waiting),
    )


class SimRouter:
    """Places requests with the configured policy; ``route`` gives the pair (prefill
    None: prefill on the decode instance), or None when the policy rejects."""

    def __init__(self, config: SimConfig, prefill: list[PrefillSim], decode: list[EngineSim]):
        self.config = config
        self.policy = build_policy(config)
        self.prefill = prefill
        self.decode = decode
        self._p_by_id = {p.instance_id: p for p in prefill}
        self._d_by_id = {d.instance_id: d for d in decode}
        local = isinstance(self.policy, SloAware) and self.policy.local_prefill_max_tokens > 0
        if not (config.is_colocated or prefill or local):
            raise ValueError(
                "without prefill instances the policy must be slo_aware with "
                "local_prefill_max_tokens > 0"
            )

    def route(self, prompt_len: int, output_len: int) -> tuple[PrefillSim | None, EngineSim] | None:
        """The instances for one request."""
        cfg = self.config
        request = RouteRequest(
            prompt_len=prompt_len,
            ttft_s=cfg.ttft_s,
            tpot_s=cfg.tpot_s,
            kv_bytes_per_token=cfg.kv_bytes_per_token,
            expected_output_len=min(output_len, cfg.expected_output_len),
        )
        pviews = [p.view or self._refresh_p(p) for p in self.prefill]
        dviews = [d.view or self._refresh_d(d) for d in self.decode]
        if cfg.is_colocated:
            decision = self.policy.decide_colocated(request, dviews)
        else:
            decision = self.policy.decide(request, pviews, dviews)
        if not decision.admit:
            return None
        d = self._d_by_id[decision.decode_id]
        p = None if decision.prefill_id is None else self._p_by_id[decision.prefill_id]
        if p is not None:
            p.view = p.view.plus(request)
        d.view = d.view.plus(request, p is None)
        return p, d

    def _refresh_p(self, p: PrefillSim) -> PrefillView:
        p.view = prefill_view(p)
        return p.view

    def _refresh_d(self, d: EngineSim) -> DecodeView:
        d.view = decode_view(d)
        return d.view
