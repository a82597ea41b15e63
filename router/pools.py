"""Starting the prefill and decode pools of a ``ServeConfig`` on Ray: every instance
at once, each on its own Ray workers (one placement group per instance), and the KV
transport between them. A colocated deployment (``ServeConfig.colocated``) has no
prefill instance and no transport: its decode instances prefill every request."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from decode.instance import DecodeInstance
from engine.config import EngineConfig
from engine.executor import RayExecutor
from kvtransfer.plan import plan_transfer
from kvtransfer.transport import Transport, actor_key, make_transport
from prefill.instance import PrefillInstance
from router.config import ServeConfig
from router.routing import Router

log = logging.getLogger(__name__)


class Pools:
    """The instances of one deployment and their KV transport (None when colocated:
    nothing moves); ``await start()``, ``shutdown()``."""

    def __init__(self, config: ServeConfig, model: str):
        self.config = config
        self.model = model
        self.transport: Transport | None = None
        self.prefill: list[PrefillInstance] = []
        self.decode: list[DecodeInstance] = []

    async def start(self) -> None:
        """Starts the transport and every instance in parallel; on any failure shuts
        down what started and raises the first error."""
        cfg = self.config
        if not cfg.colocated:
            name = cfg.kv.resolved_transport(cfg.device)
            # Same-host shared memory listens nowhere; the others bind their servers.
            options = {} if name == "local" else {"host": cfg.kv.bind_host}
            self.transport = make_transport(name, **options)
        prefill = [asyncio.to_thread(self._prefill, i) for i in range(cfg.prefill.num_instances)]
        decode = [asyncio.to_thread(self._decode, i) for i in range(cfg.decode.num_instances)]
        results = await asyncio.gather(*prefill, *decode, return_exceptions=True)
        self.prefill = [r for r in results if isinstance(r, PrefillInstance)]
        self.decode = [r for r in results if isinstance(r, DecodeInstance)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.shutdown()
            raise errors[0]
        self._check_compatible()
        if self.transport is not None and cfg.kv.connect_at_start:
            await self._connect(self.transport)

    async def _connect(self, transport: Transport) -> None:
        """Opens every (prefill rank, decode rank) channel a transfer can use, all at
        once, so that no request's transfer pays for it (``Transport.connect``). A
        channel that fails to open is logged and left to the first transfer, which
        reports the error where it belongs."""
        pairs = {
            (actor_key(src), actor_key(dst)): (src, dst)
            for p in self.prefill
            for d in self.decode
            for m in plan_transfer(p.layout, d.layout, d.shape, [0], [0])
            for src, dst in [(p.workers[m.src_rank], d.workers[m.dst_rank])]
        }
        timeout = self.config.kv.transfer_timeout_s
        results = await asyncio.gather(
            *(transport.connect(src, dst, timeout) for src, dst in pairs.values()),
            return_exceptions=True,
        )
        for error in (r for r in results if isinstance(r, BaseException)):
            log.warning("a KV channel did not open at start (its first transfer will): %s", error)

    async def shutdown(self) -> None:
        """Stops every instance's workers (in parallel), then the transport."""
        insts: list[PrefillInstance | DecodeInstance] = [*self.prefill, *self.decode]
        await asyncio.gather(*(asyncio.to_thread(i.shutdown) for i in insts))
        self.prefill, self.decode = [], []
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token over every layer (what a transfer moves per token)."""
        shape = self.decode[0].shape
        return shape.head_block_bytes // shape.block_size * shape.num_kv_heads * shape.num_layers

    async def profile(self, router: Router) -> None:
        """Fits every instance's latency model in ``router`` from a short synthetic run,
        one instance at a time (they share the machine's cores here, a cluster's GPUs
        elsewhere). Decode instances are profiled on prefill too when they prefill
        (colocated, or local prefill on)."""
        local = self.config.colocated or router.config.local_prefill_max_tokens > 0
        for p in self.prefill:
            await asyncio.to_thread(router.profile, p.instance_id, p, True, False)
        for d in self.decode:
            await asyncio.to_thread(router.profile, d.instance_id, d, local, True)

    def _engine_config(self, role: str) -> EngineConfig:
        return replace(self.config.engine_config(role), model=self.model)

    def _executor(self, role: str) -> RayExecutor:
        pool = self.config.prefill if role == "prefill" else self.config.decode
        return RayExecutor(
            self._engine_config(role),
            placement_strategy=pool.placement_strategy,
            num_cpus_per_worker=pool.num_cpus_per_worker,
        )

    def _prefill(self, i: int) -> PrefillInstance:
        executor = self._executor("prefill")
        try:
            return PrefillInstance(
                self._engine_config("prefill"),
                executor,
                instance_id=f"prefill-{i}",
                policy=self.config.prefill.policy,
                lease_s=self.config.kv.lease_s,
            )
        except BaseException:
            executor.shutdown()
            raise

    def _decode(self, i: int) -> DecodeInstance:
        executor = self._executor("decode")
        try:
            return DecodeInstance(
                self._engine_config("decode"),
                self.transport,
                executor,
                # "colocated-i" as in the simulator: its role shows in load reports
                instance_id=f"{'colocated' if self.config.colocated else 'decode'}-{i}",
                transfer_timeout_s=self.config.kv.transfer_timeout_s,
            )
        except BaseException:
            executor.shutdown()
            raise

    def _check_compatible(self) -> None:
        """Both pools must hold KV the same way (dtype, block size) to hand it over."""
        if not self.prefill:  # colocated: nothing is handed over
            return
        p, d = self.prefill[0].executor.info, self.decode[0].executor.info
        if (p.dtype, p.block_size) != (d.dtype, d.block_size):
            raise ValueError(
                f"prefill KV ({p.dtype}, block {p.block_size}) and decode KV "
                f"({d.dtype}, block {d.block_size}) differ; set one dtype for both pools"
            )
