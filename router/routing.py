"""The controller's router: one latency model per instance (profiled at start-up,
refined from every step), the instances' load as the policy's views, and a decision
per request (router/policies.py). No tensors: it reads schedulers and block managers."""

from __future__ import annotations

import time
from collections.abc import Mapping

from decode.instance import DecodeInstance
from engine.block_manager import block_hashes
from engine.core import EngineCore, StepStats
from engine.model_runner import SeqStep
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from prefill.instance import PrefillInstance
from router.config import RouterConfig
from router.latency_model import DecodeSample, LatencyModel, PrefillSample
from router.latency_profile import ProfilingPlan, profiling_plan
from router.policy_views import Decision, DecodeView, PrefillView, RouteRequest

_PROFILE = SamplingParams(temperature=0.0, max_tokens=1)


class Router:
    """Decides each request's pair and keeps the latency models current."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.policy = config.make_policy()
        self.models: dict[str, LatencyModel] = {}
        # Views are rebuilt only after their instance stepped; decisions in between
        # update them with ``plus`` (so a burst between two steps still spreads out).
        self._prefill_views: dict[str, PrefillView] = {}
        self._decode_views: dict[str, DecodeView] = {}

    def model(self, instance_id: str) -> LatencyModel:
        """The instance's latency model (the prior until it is fitted)."""
        if instance_id not in self.models:
            self.models[instance_id] = LatencyModel(
                window=self.config.latency_window, refit_every=self.config.latency_refit_every
            )
        return self.models[instance_id]

    def observe(self, instance_id: str, stats: StepStats | None) -> None:
        """Refines the instance's model with one step (pure prefill or pure decode) and
        marks its view stale."""
        self._prefill_views.pop(instance_id, None)
        self._decode_views.pop(instance_id, None)
        if stats is None or stats.seconds <= 0:
            return
        if stats.prefill_lengths and not stats.num_decodes:
            self.model(instance_id).observe(PrefillSample(stats.prefill_lengths, stats.seconds))
        elif stats.num_decodes and not stats.prefill_lengths:
            sample = DecodeSample(stats.num_decodes, stats.decode_context_tokens, stats.seconds)
            self.model(instance_id).observe(sample)

    def decide(
        self,
        token_ids: list[int],
        params: SamplingParams,
        slo: tuple[float, float],
        prefill: list[PrefillInstance],
        decode: list[DecodeInstance],
        kv_bytes_per_token: int,
        routed: Mapping[str, tuple[int, int]] | None = None,
    ) -> Decision:
        """The pair for one request (``Decision.prefill_id`` None: prefill on the decode
        instance itself); ``admit`` False when it should be rejected. ``routed`` counts,
        per decode instance, the requests (and prompt tokens) already sent its way that
        are still prefilling elsewhere: its batch will hold them too. No ``prefill``
        instances: a colocated deployment, placed by ``Policy.decide_colocated``."""
        routed = routed or {}
        hashes = block_hashes(token_ids, decode[0].block_manager.block_size) if decode else []
        cached = {
            p.instance_id: p.block_manager.cached_prefix_tokens(token_ids, hashes) for p in prefill
        }
        for d in decode:
            cached[d.instance_id] = d.block_manager.cached_prefix_tokens(token_ids, hashes)
        request = RouteRequest(
            prompt_len=len(token_ids),
            ttft_s=slo[0],
            tpot_s=slo[1],
            kv_bytes_per_token=kv_bytes_per_token,
            expected_output_len=min(params.max_tokens, self.config.expected_output_len),
            cached_tokens=cached,
        )
        pviews = [self._prefill_view(p) for p in prefill]
        dviews = [self._decode_view(d, routed.get(d.instance_id, (0, 0))) for d in decode]
        if prefill:
            decision = self.policy.decide(request, pviews, dviews)
        else:
            decision = self.policy.decide_colocated(request, dviews)
        if decision.admit:
            p_id, d_id = decision.prefill_id, decision.decode_id
            if p_id is not None:
                self._prefill_views[p_id] = self._prefill_views[p_id].plus(request)
            self._decode_views[d_id] = self._decode_views[d_id].plus(request, p_id is None)
        return decision

    def _prefill_view(self, p: PrefillInstance) -> PrefillView:
        view = self._prefill_views.get(p.instance_id)
        if view is not None:
            return view
        queued = [*p.scheduler.waiting, *p.scheduler.running]
        view = PrefillView(
            instance_id=p.instance_id,
            queued_prefill_tokens=sum(s.num_uncomputed_tokens for s in queued),
            queued_requests=len(queued),
            blocks_free=p.block_manager.num_free_blocks,
            block_size=p.block_manager.block_size,
            model=self.model(p.instance_id),
            max_num_batched_tokens=p.config.scheduler.max_num_batched_tokens,
        )
        self._prefill_views[p.instance_id] = view
        return view

    def _decode_view(self, d: DecodeInstance, routed: tuple[int, int]) -> DecodeView:
        view = self._decode_views.get(d.instance_id)
        if view is not None:
            return view
        running = d.scheduler.running
        view = DecodeView(
            instance_id=d.instance_id,
            batch_size=len(running),
            context_tokens=sum(len(s) for s in running),
            pending_handoffs=len(d.pending) + len(d.transferring) + routed[0],
            blocks_free=d.block_manager.num_free_blocks,
            block_size=d.block_manager.block_size,
            max_num_seqs=d.config.scheduler.max_num_seqs,
            model=self.model(d.instance_id),
            pending_tokens=sum(len(h.prompt_token_ids) for h in d.pending) + routed[1],
            local_prefill_tokens=sum(s.num_uncomputed_tokens for s in d.scheduler.waiting),
            waiting_requests=len(d.scheduler.waiting),
        )
        self._decode_views[d.instance_id] = view
        return view

    def profile(self, instance_id: str, inst: EngineCore, prefill: bool, decode: bool) -> None:
        """Fits the instance's model from a short run of synthetic steps on its workers
        (before it serves: it needs the executor to itself)."""
        cfg, bm = inst.config, inst.block_manager
        plan = profiling_plan(
            max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
            max_num_seqs=cfg.scheduler.max_num_seqs,
            max_model_len=inst.max_model_len,
            kv_capacity_tokens=bm.num_blocks * bm.block_size,
            num_points=4,
            repeats=self.config.profile_repeats,
        )
        samples = _run_plan(inst, plan, prefill, decode)
        if samples:
            self.model(instance_id).fit(samples)


def _run_plan(
    inst: EngineCore, plan: ProfilingPlan, prefill: bool, decode: bool
) -> list[PrefillSample | DecodeSample]:
    samples: list[PrefillSample | DecodeSample] = []
    points: list[tuple[list[int], bool]] = []
    if prefill:
        points += [(list(b), True) for b in plan.prefill_batches]
    if decode:
        points += [([max(1, ctx // bs)] * bs, False) for bs, ctx in plan.decode_points]
    for lengths, is_prefill in points:
        for repeat in range(plan.repeats + 1):  # the first run warms up and is dropped
            seconds = timed_step(inst, lengths, is_prefill)
            if seconds is None or not repeat:
                continue
            if is_prefill:
                samples.append(PrefillSample(tuple(lengths), seconds))
            else:
                samples.append(DecodeSample(len(lengths), sum(lengths), seconds))
    return samples


def timed_step(inst: EngineCore, lengths: list[int], is_prefill: bool) -> float | None:
    """One forward over sequences of ``lengths`` tokens: whole prompts, or one new token
    each on top of that context. None when the blocks do not fit."""
    bm, vocab = inst.block_manager, inst.model_config.vocab_size
    seqs = [
        Sequence(f"profile-{i}", [(7 * i + j) % vocab for j in range(n)], _PROFILE)
        for i, n in enumerate(lengths)
    ]
    try:
        if not all(bm.allocate_slots(s, len(s)) for s in seqs):
            return None
        steps = [
            SeqStep(s.request_id, s.token_ids, 0, s.block_table, True, _PROFILE)
            if is_prefill
            else SeqStep(s.request_id, s.token_ids[-1:], len(s) - 1, s.block_table, True, _PROFILE)
            for s in seqs
        ]
        steps.sort(key=lambda s: len(s.token_ids) == 1)
        t0 = time.perf_counter()
        inst.executor.execute(steps)
        return time.perf_counter() - t0
    finally:
        for s in seqs:
            bm.free(s)
        inst.executor.free([s.request_id for s in seqs])
