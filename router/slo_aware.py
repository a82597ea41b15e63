"""The SLO-aware routing policy: choose the (prefill, decode) pair jointly (no torch).

Per candidate (a prefill instance p and a decode instance d, or d prefilling the
request itself) the latency models predict

- TTFT = p's queued prefill work + this prompt's uncached part on p (its cached prefix
  there is free) + KV transfer (the prompt's KV bytes that d does not already hold in
  its prefix cache ÷ bandwidth of (p, d));
- TPOT = d's decode step once this request and d's pending handoffs are admitted;
- local prefill on d (conditional disaggregation, when the uncached part is at most
  ``local_prefill_max_tokens``; 0 = off): TTFT = d's running step + its queued local
  prefills + this prefill, no transfer; TPOT adds the prefill's stall of d's batch
  spread over the expected output. A colocated deployment (``decide_colocated``) has
  only these candidates, whatever the prompt's length.

Objective: minimise the worst normalised latency ``max(TTFT/ttft_slo, TPOT/tpot_slo)``,
then the sum as a tie-break; an instance without room now (blocks or sequence slots)
adds a large penalty. A candidate meets the SLOs iff that worst ratio is ≤ 1 with room
on both sides, so a meeting pair is chosen whenever one exists, and among those the
one leaving the most slack on its tighter SLO, which spreads load so later requests
can still make it; when none meets, the one closest to meeting. Local prefill wins only
when strictly better.

Cost: p enters the score only through its own TTFT term, and the score is monotone in
it, so with uniform bandwidth the best prefill instance is the same for every d: one
pass over each pool, O(P + D). With per-pair bandwidth the scores of all pairs are one
numpy (P × D) matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import numpy as np

from router.bandwidth import Bandwidth
from router.policy_base import Policy, check_colocated, check_pools, meets_slo
from router.policy_views import Decision, DecodeView, PrefillView, RouteRequest

NO_ROOM = 1e3  # added to a normalised latency when an instance has no room now


class Candidate(NamedTuple):
    """A scored choice: ``prefill`` index (None: local prefill) and ``decode`` index."""

    key: tuple[float, float]  # (worst ratio, sum of ratios), penalties included
    prefill: int | None
    decode: int
    ttft_s: float
    tpot_s: float
    room: bool


def _meets(c: Candidate) -> bool:
    """Both SLOs met, with room (the worst normalised latency is at most 1)."""
    return c.room and c.key[0] <= 1.0


def _side(
    slo: float, estimates: list[tuple[float, bool]]
) -> tuple[list[float], list[float], list[float]]:
    """(seconds, room penalties, normalised latencies with penalties) of one pool."""
    seconds = [t for t, _ in estimates]
    penalty = [0.0 if ok else NO_ROOM for _, ok in estimates]
    return seconds, penalty, [t / slo + pen for t, pen in zip(seconds, penalty, strict=True)]


K = TypeVar("K", float, tuple[float, float])


def _argmin(values: list[K]) -> int:
    """Index of the smallest value (the first on ties)."""
    return min(range(len(values)), key=values.__getitem__)


class SloAware(Policy):
    """Joint (prefill, decode) choice against the request's SLOs (see the module doc).
    ``local_prefill_max_tokens``: largest uncached part a decode instance may prefill
    itself (0 = never)."""

    name = "slo_aware"

    def __init__(
        self,
        *,
        bandwidth: Bandwidth | float | None = None,
        on_slo_miss: str = "serve",
        transfer_in: str = "ttft",
        local_prefill_max_tokens: int = 0,
    ) -> None:
        super().__init__(bandwidth=bandwidth, on_slo_miss=on_slo_miss, transfer_in=transfer_in)
        if isinstance(local_prefill_max_tokens, bool) or local_prefill_max_tokens < 0:
            raise ValueError(
                f"local_prefill_max_tokens must be an int >= 0, got {local_prefill_max_tokens!r}"
            )
        self.local_prefill_max_tokens = local_prefill_max_tokens

    def decide(
        self, request: RouteRequest, prefill: Sequence[PrefillView], decode: Sequence[DecodeView]
    ) -> Decision:
        """The best candidate; ValueError when a pool is empty (an empty prefill pool is
        allowed with local prefill on, but then a prompt too long for it is an error)."""
        if not (self.local_prefill_max_tokens and decode):
            check_pools(prefill, decode)
        best = self._best_remote(request, prefill, decode) if prefill else None
        if self.local_prefill_max_tokens:
            # A short prompt that meets its SLOs where it will decode stays there (as in
            # Dynamo): no transfer, and the prefill pool keeps its capacity for long ones.
            local = self._best_local(request, decode, self.local_prefill_max_tokens)
            if local is not None and (best is None or local.key < best.key or _meets(local)):
                best = local
        if best is None:
            raise ValueError(
                f"no prefill instance, and the prompt ({request.prompt_len} tokens) is over "
                f"local_prefill_max_tokens ({self.local_prefill_max_tokens}) everywhere"
            )
        return self._explain(request, best, prefill, decode)

    def decide_colocated(self, request: RouteRequest, decode: Sequence[DecodeView]) -> Decision:
        """The best local prefill among all instances (``local_prefill_max_tokens``
        does not apply: a colocated instance prefills every prompt itself)."""
        check_colocated(decode)
        best = self._best_local(request, decode, None)
        if best is None:  # unreachable: without a limit every instance is a candidate
            raise ValueError("no colocated instance to prefill the request")
        return self._explain(request, best, (), decode)

    def _best_remote(
        self, request: RouteRequest, prefill: Sequence[PrefillView], decode: Sequence[DecodeView]
    ) -> Candidate:
        slo_t, slo_o = request.ttft_s, request.tpot_s
        p_ttft, p_pen, p_ratio = _side(slo_t, [p.estimate(request) for p in prefill])
        d_tpot, d_pen, d_ratio = _side(slo_o, [d.estimate(request) for d in decode])
        kv_bytes = [request.kv_bytes_to(d.instance_id) for d in decode]
        if self.bandwidth.is_uniform:
            transfers = [b / self.bandwidth.default for b in kv_bytes]
            i = _argmin(p_ratio)  # the best prefill instance is the same for every d
            j = self._best_decode(request, p_ratio[i], d_ratio, transfers)
            transfer = transfers[j]
        else:
            i, j, transfer = self._best_pair(request, p_ratio, d_ratio, prefill, decode, kv_bytes)
        ttft, tpot = self.with_transfer(request, p_ttft[i], d_tpot[j], transfer)
        rt, ro = ttft / slo_t + p_pen[i], tpot / slo_o + d_pen[j]
        room = p_pen[i] == 0.0 and d_pen[j] == 0.0
        return Candidate((max(rt, ro), rt + ro), i, j, ttft, tpot, room)

    def _best_decode(
        self, request: RouteRequest, rt0: float, d_ratio: list[float], transfers: list[float]
    ) -> int:
        """The best decode instance given the prefill side's normalised TTFT ``rt0``
        and each decode instance's transfer seconds (uniform bandwidth: O(D))."""
        if self.transfer_in == "ttft":
            rts = [rt0 + x / request.ttft_s for x in transfers]
            ros = d_ratio
        else:
            k = 1.0 / (max(1, request.expected_output_len - 1) * request.tpot_s)
            rts = [rt0] * len(d_ratio)
            ros = [r + x * k for r, x in zip(d_ratio, transfers, strict=True)]
        return _argmin([(max(a, b), a + b) for a, b in zip(rts, ros, strict=True)])

    def _best_pair(
        self,
        request: RouteRequest,
        p_ratio: list[float],
        d_ratio: list[float],
        prefill: Sequence[PrefillView],
        decode: Sequence[DecodeView],
        kv_bytes: list[float],
    ) -> tuple[int, int, float]:
        """(prefill index, decode index, transfer seconds) of the best pair when the
        bandwidth differs per pair: the scores of all pairs as one numpy matrix."""
        spb = self.bandwidth.seconds_per_byte(
            tuple(p.instance_id for p in prefill), tuple(d.instance_id for d in decode)
        )
        transfer = spb * np.asarray(kv_bytes)[None, :]
        rt = np.asarray(p_ratio)[:, None]
        ro = np.asarray(d_ratio)[None, :]
        if self.transfer_in == "ttft":
            rt = rt + transfer / request.ttft_s
        else:
            per_token = transfer / max(1, request.expected_output_len - 1)
            ro = ro + per_token / request.tpot_s
        worst = np.maximum(rt, ro)
        tied = worst <= worst.min() + 1e-12
        flat = int(np.argmin(np.where(tied, rt + ro, np.inf)))
        i, j = divmod(flat, len(decode))
        return i, j, float(transfer[i, j])

    def _best_local(
        self, request: RouteRequest, decode: Sequence[DecodeView], limit: int | None
    ) -> Candidate | None:
        """The best local prefill on an instance whose uncached part is at most
        ``limit`` tokens (None: any)."""
        best: Candidate | None = None
        for j, d in enumerate(decode):
            if limit is not None and request.uncached(d.instance_id) > limit:
                continue
            ttft, tpot = d.local_prefill(request)
            room = d.estimate(request)[1]
            penalty = 0.0 if room else NO_ROOM
            rt, ro = ttft / request.ttft_s + penalty, tpot / request.tpot_s + penalty
            key = (max(rt, ro), rt + ro)
            if best is None or key < best.key:
                best = Candidate(key, None, j, ttft, tpot, room)
        return best

    def _explain(
        self,
        request: RouteRequest,
        best: Candidate,
        prefill: Sequence[PrefillView],
        decode: Sequence[DecodeView],
    ) -> Decision:
        d_id = decode[best.decode].instance_id
        if best.prefill is None:
            p_id = None
            where = f"local prefill on {d_id} ({request.uncached(d_id)} uncached tokens)"
        else:
            p_id = prefill[best.prefill].instance_id
            where = f"{p_id} -> {d_id}"
        ratios = (
            f"TTFT {best.ttft_s / request.ttft_s:.2f}, TPOT {best.tpot_s / request.tpot_s:.2f}"
            " of the SLOs"
        )
        latency = (best.ttft_s, best.tpot_s)
        if meets_slo(request, latency, best.room):
            reason = f"slo_aware: {where} meets both SLOs ({ratios})"
        else:
            room = "" if best.room else ", no room now"
            reason = f"slo_aware: no candidate meets both SLOs; closest {where} ({ratios}{room})"
        return self.make_decision(request, (p_id, d_id), latency, best.room, reason)
