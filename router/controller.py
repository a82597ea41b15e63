"""The cluster controller: starts the prefill and decode pools on Ray from a
``ServeConfig``, drives every instance from one asyncio event loop, moves handoffs
from prefill to decode, and streams each request's tokens to its caller. A colocated
deployment (no prefill instance) runs the decode loops only: each decode instance
prefills its requests itself.

One task per instance runs its step loop. Schedulers and block managers are only ever
touched on the event loop's thread; the forwards and the KV transfers are awaited, so
all instances compute at once. Lifecycle timestamps (DESIGN.md) are stamped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from decode.instance import DecodeInstance
from engine.core import Prompt, RequestIdInUse, RequestOutput
from engine.executor import connect_ray, ray_node_count
from engine.sampling_params import SamplingParams
from kvtransfer.handoff import KVSource
from prefill.instance import PrefillInstance
from router.config import ServeConfig
from router.pools import Pools
from router.routing import Router
from router.streams import ClusterOutput, RequestStream

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.5  # an idle loop still wakes this often (leases, shutdown)


class SLOUnattainable(Exception):
    """Admission rejected a request: no pair is predicted to meet its SLOs
    (``router.on_slo_miss: reject``); the API answers RESOURCE_EXHAUSTED."""


class Controller:
    """Owns the pools. ``await start()``, then ``generate(...)`` (an async iterator of
    ``ClusterOutput``), ``abort(request_id)``, and ``await stop()``."""

    def __init__(self, config: ServeConfig, model: str | None = None):
        self.config = config
        path = model or config.model
        if path is None:
            raise ValueError("the controller needs a model directory (config.model)")
        self.model: str = path
        self.prefill: list[PrefillInstance] = []
        self.decode: list[DecodeInstance] = []
        self._streams: dict[str, RequestStream] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._owns_ray = False
        self._connected = False
        self._stopping = False
        self.router = Router(config.router)
        self._pools: Pools | None = None
        self._prefill_by_id: dict[str, PrefillInstance] = {}
        self._decode_by_id: dict[str, DecodeInstance] = {}
        self._kv_bytes_per_token = 0
        # Per decode instance: requests routed to it still prefilling elsewhere, tokens.
        self._routed: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        """Connects to Ray (starting a local cluster when there is none) and settles
        ``kv.transport: auto`` for the cluster (:meth:`ServeConfig.for_cluster`).
        Idempotent; :meth:`start` calls it. A process that serves gRPC calls this
        before its server starts: starting Ray forks, and a fork while grpcio's threads
        run can hang the child (seen: a raylet that never started)."""
        if self._connected:
            return
        self._owns_ray = connect_ray(self.config.ray_address)
        self.config = self.config.for_cluster(ray_node_count())
        self._connected = True

    async def start(self) -> None:
        """Starts every instance (in parallel) and their loops; returns once all are
        ready. On failure everything started is stopped and the error raised."""
        self.connect()
        cfg = self.config
        try:
            self._pools = Pools(cfg, self.model)
            await self._pools.start()
            self.prefill, self.decode = self._pools.prefill, self._pools.decode
            self._prefill_by_id = {p.instance_id: p for p in self.prefill}
            self._decode_by_id = {d.instance_id: d for d in self.decode}
            self._kv_bytes_per_token = self._pools.kv_bytes_per_token
            if cfg.router.profile_at_start:
                await self._pools.profile(self.router)
        except BaseException:
            await self.stop()
            raise
        for name in [p.instance_id for p in self.prefill] + [d.instance_id for d in self.decode]:
            self._wake[name] = asyncio.Event()
        self._tasks = [asyncio.create_task(self._prefill_loop(p)) for p in self.prefill]
        self._tasks += [asyncio.create_task(self._decode_loop(d)) for d in self.decode]

    async def stop(self) -> None:
        """Aborts every request, stops the loops, the instances and the transport."""
        self._stopping = True
        for rid in list(self._streams):
            self.abort(rid)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        if self._pools is not None:
            await self._pools.shutdown()
            self._pools = None
        self.prefill, self.decode = [], []
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
        self._connected = False

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        slo: tuple[float, float] | None = None,
    ) -> AsyncGenerator[ClusterOutput, None]:
        """Streams one request: the first token from its prefill instance (or its
        decode instance, prefilling it itself), then each decode step's update, the
        last one ``finished``. ``slo`` (ttft_s, tpot_s)
        overrides the deployment's. ValueError (naming the bad value) and
        ``SLOUnattainable`` (rejected by admission) come before anything streams.
        Closing the iterator early aborts the request wherever it is and frees its
        blocks on both sides."""
        rid = self._admit(prompt, params or SamplingParams(), request_id, slo)
        stream = self._streams[rid]
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the caller went away: nobody reads the stream any more
                self._abort_instances(rid, stream)
            self._await_decode(stream, False)
            self._streams.pop(rid, None)

    def _admit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None,
        slo: tuple[float, float] | None,
    ) -> str:
        if not self.decode or self._stopping:
            raise RuntimeError("the controller is not running")
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex[:12]}"
        if rid in self._streams:
            raise RequestIdInUse(rid)
        ids = self.decode[0].encode(prompt)
        if self.prefill:  # none when colocated
            self.prefill[0].encode(ids)  # the prefill instances must hold it too
        targets = slo or (self.config.slo.ttft_s, self.config.slo.tpot_s)
        decision = self.router.decide(
            ids, params, targets, self.prefill, self.decode, self._kv_bytes_per_token, self._routed
        )
        if not decision.admit:
            raise SLOUnattainable(f"request {rid!r} rejected: {decision.reason}")
        d = self._decode_by_id[decision.decode_id]
        p = self._prefill_by_id[decision.prefill_id] if decision.prefill_id else None
        stream = RequestStream(p, d, prompt_len=len(ids))
        self._streams[rid] = stream
        try:
            if p is None:  # colocated, or conditional disaggregation: prefilled here
                d.add_request(ids, params, rid)
            else:
                p.add_request(ids, params, rid)
                self._await_decode(stream, True)
        except BaseException:
            self._streams.pop(rid)
            raise
        self._wake[(p or d).instance_id].set()
        return rid

    def _await_decode(self, stream: RequestStream, waiting: bool) -> None:
        """Counts (or stops counting) ``stream`` against its decode instance's load."""
        if stream.awaiting_decode == waiting:
            return
        stream.awaiting_decode = waiting
        sign = 1 if waiting else -1
        n, tokens = self._routed.get(stream.decode.instance_id, (0, 0))
        self._routed[stream.decode.instance_id] = (n + sign, tokens + sign * stream.prompt_len)

    def abort(self, request_id: str) -> bool:
        """Stops a request in any phase (queued, prefilling, under lease, transferring,
        decoding) and frees its blocks on both sides; its stream ends with
        ``finish_reason`` "abort". False if unknown."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        self._abort_instances(request_id, stream)
        stream.publish_abort(request_id)
        return True

    def _abort_instances(self, request_id: str, stream: RequestStream) -> None:
        if stream.prefill is not None:
            stream.prefill.abort(request_id)
        stream.decode.abort(request_id)
        stream.decode.records.pop(request_id, None)

    # ------------------------------------------------------------------ loops

    async def _idle(self, instance_id: str, timeout_s: float) -> None:
        event = self._wake[instance_id]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout_s))
        event.clear()

    async def _prefill_loop(self, inst: PrefillInstance) -> None:
        while not self._stopping:
            try:
                inst.expire_leases()
                if not inst.has_work() or inst.stalled:
                    # Idle, or every block is leased: wait for a release (a decode
                    # instance's ack wakes this loop) or the next lease expiry.
                    inst.stalled = False
                    deadline = inst.leases.next_deadline()
                    wait = _IDLE_WAIT_S if deadline is None else deadline - time.monotonic()
                    await self._idle(inst.instance_id, min(wait, _IDLE_WAIT_S))
                    continue
                outs = await inst.step_async()
                self.router.observe(inst.instance_id, inst.last_step)
                for out in outs:
                    self._publish(out, "prefill")
                for handoff in inst.take_handoffs():
                    stream = self._streams.get(handoff.request_id)
                    if stream is None:  # gone while it prefilled
                        inst.release(handoff.request_id)
                        continue
                    stream.decode.add_handoff(handoff)
                    self._await_decode(stream, False)
                    self._wake[stream.decode.instance_id].set()
            except Exception as e:  # a failed step fails its instance's requests only
                self._fail(inst.instance_id, e)

    async def _decode_loop(self, inst: DecodeInstance) -> None:
        sources: dict[str, KVSource] = {p.instance_id: p for p in self.prefill}
        while not self._stopping:
            try:
                if inst.pending:
                    n = len(inst.pending)
                    for rid in await inst.admit(sources):
                        self._on_admitted(inst, rid)
                    if len(inst.pending) < n:  # acks freed leased blocks: stalled prefill
                        for p in self.prefill:  # instances may go on
                            self._wake[p.instance_id].set()
                if inst.scheduler.has_unfinished():
                    outs = await inst.step_async()
                    self.router.observe(inst.instance_id, inst.last_step)
                    for out in outs:
                        self._publish(out, "decode")
                else:
                    await self._idle(inst.instance_id, _IDLE_WAIT_S)
            except Exception as e:
                self._fail(inst.instance_id, e)

    def _on_admitted(self, inst: DecodeInstance, rid: str) -> None:
        record = inst.records.pop(rid, None)
        stream = self._streams.get(rid)
        if stream is not None and record is not None:
            stream.on_transfer(record)

    def _publish(self, out: RequestOutput, phase: str) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.publish(out, phase)

    def _fail(self, instance_id: str, error: Exception) -> None:
        log.exception("instance %s failed a step", instance_id, exc_info=error)
        for rid, stream in list(self._streams.items()):
            if instance_id in (stream.prefill_id, stream.decode.instance_id):
                self._abort_instances(rid, stream)
                stream.queue.put_nowait(RuntimeError(f"{instance_id} failed: {error}"))

    # ------------------------------------------------------------------ introspection

    def check_invariants(self) -> None:
        """RuntimeError unless every instance's blocks add up and only live requests
        hold blocks (DESIGN.md invariant 3)."""
        for p in self.prefill:
            p.block_manager.check_invariants(p.live_sequences())
        for d in self.decode:
            d.block_manager.check_invariants(d.live_sequences())

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every instance's load and counters (``stats()`` of each), by instance id."""
        insts: list[PrefillInstance | DecodeInstance] = [*self.prefill, *self.decode]
        return {i.instance_id: i.stats() for i in insts}
