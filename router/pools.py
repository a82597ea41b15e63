"""Starting the prefill and decode pools of a ``ServeConfig`` on Ray: every instance
at once, each on its own Ray workers (one placement group per instance)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from decode.instance import DecodeInstance
from engine.config import EngineConfig
from engine.executor import RayExecutor
from kvtransfer.transport import Transport
from prefill.instance import PrefillInstance
from router.config import ServeConfig


class Pools:
    """The instances of one deployment (``await start()``; ``shutdown()``)."""

    def __init__(self, config: ServeConfig, model: str, transport: Transport):
        self.config = config
        self.model = model
        self.transport = transport
        self.prefill: list[PrefillInstance] = []
        self.decode: list[DecodeInstance] = []

    async def start(self) -> None:
        """Starts every instance in parallel; on any failure shuts down the ones that
        started and raises the first error."""
        cfg = self.config
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

    async def shutdown(self) -> None:
        """Stops every instance's workers (in parallel)."""
        insts: list[PrefillInstance | DecodeInstance] = [*self.prefill, *self.decode]
        await asyncio.gather(*(asyncio.to_thread(i.shutdown) for i in insts))
        self.prefill, self.decode = [], []

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
                instance_id=f"decode-{i}",
                transfer_timeout_s=self.config.kv.transfer_timeout_s,
            )
        except BaseException:
            executor.shutdown()
            raise

    def _check_compatible(self) -> None:
        """Both pools must hold KV the same way (dtype, block size) to hand it over."""
        p, d = self.prefill[0].executor.info, self.decode[0].executor.info
        if (p.dtype, p.block_size) != (d.dtype, d.block_size):
            raise ValueError(
                f"prefill KV ({p.dtype}, block {p.block_size}) and decode KV "
                f"({d.dtype}, block {d.block_size}) differ; set one dtype for both pools"
            )
