"""Where an instance's ranks run: ``ModelRunner`` in this process (tp = 1) or
``RayExecutor``, one ``Worker`` actor per rank in a Ray placement group.

Both satisfy ``Executor``, the interface ``decode.llm.LLM`` drives. Ray is imported only
when a ``RayExecutor`` is made, so the single-process path never pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from engine.config import EngineConfig
from engine.gemv import BLAS_ENV
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, RuntimeInfo, SeqStep
from engine.sampler import SamplerOutput
from engine.worker import Worker
from kvtransfer.worker import remote_class

PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
# Ray's unix sockets live under the temp dir: sun_path holds ~107 bytes and Ray appends
# ~60 (session_<timestamp>_<pid>/sockets/plasma_store), so the dir must stay short.
_MAX_RAY_TEMP_DIR_LEN = 45


class Executor(Protocol):
    """What runs an instance's steps: one rank in this process or several elsewhere."""

    @property
    def info(self) -> RuntimeInfo: ...

    def execute(self, steps: list[SeqStep]) -> SamplerOutput: ...

    def free(self, request_ids: list[str]) -> None: ...


@runtime_checkable
class SupportsShutdown(Protocol):
    def shutdown(self) -> None: ...


async def execute_async(executor: Executor, steps: list[SeqStep]) -> SamplerOutput:
    """Runs one step without blocking the event loop: Ray workers are awaited, an
    in-process runner computes in a thread (torch releases the GIL)."""
    if isinstance(executor, RayExecutor):
        return await executor.execute_async(steps)
    return await asyncio.to_thread(executor.execute, steps)


def make_executor(config: EngineConfig, model_cfg: ModelConfig) -> Executor:
    """This process's ModelRunner for one rank (tp = pp = 1), else Ray workers."""
    if config.parallel.world_size == 1:
        return ModelRunner(config, model_cfg)
    return RayExecutor(config)


def _ray_temp_dir() -> str:
    """``run/ray`` under the working directory, or a short /tmp dir when that path is
    too long for Ray's unix sockets."""
    path = (Path(os.environ.get("PDSERVE_RUN_DIR", "run")) / "ray").resolve()
    if len(str(path)) > _MAX_RAY_TEMP_DIR_LEN:
        return tempfile.mkdtemp(prefix="pdray-")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def connect_ray(address: str | None) -> bool:
    """Reuses an initialized Ray, else connects to ``address`` (or, inside a ``ray job
    submit`` job, to the job's cluster: ``RAY_ADDRESS`` is set), else starts a local
    cluster (no dashboard). Returns whether this call connected (and so should
    disconnect at the end)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = "auto"
    if address is not None:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, _temp_dir=_ray_temp_dir())
    return True


def ray_node_count() -> int:
    """Alive nodes of the connected Ray cluster."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


class RayExecutor:
    """An instance of max(tp, ep) x ``pp`` ranks, one Ray actor each, placed by one
    placement group; rank = stage * max(tp, ep) + rank in stage (``engine.pipeline``).
    With ep > tp a stage is ep/tp TP replicas sharing one MoE group.

    Every call that waits on the actors has a timeout and raises ``TimeoutError``
    naming the call; after a step timeout the instance is unusable (ranks may be stuck
    in a collective): shut it down. Use ``shutdown()`` (or ``with``) to free the
    actors, the placement group and, if this executor started it, Ray.
    """

    def __init__(
        self,
        config: EngineConfig,
        tp: int | None = None,
        pp: int | None = None,
        address: str | None = None,
        placement_strategy: str = "STRICT_PACK",
        num_cpus_per_worker: float | None = None,
        start_timeout_s: float = 120.0,
        load_timeout_s: float = 600.0,
        step_timeout_s: float = 120.0,
    ):
        parallel = replace(
            config.parallel,
            tp=config.parallel.tp if tp is None else tp,
            pp=config.parallel.pp if pp is None else pp,
        )
        if placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, "
                f"got {placement_strategy!r}"
            )
        if num_cpus_per_worker is not None and num_cpus_per_worker <= 0:
            raise ValueError(f"num_cpus_per_worker must be > 0, got {num_cpus_per_worker}")
        # Refuse a layout the model cannot take before any actor starts.
        parallel.check_model(ModelConfig.from_pretrained(config.model))
        self.config = replace(config, parallel=parallel)
        self.tp = parallel.tp
        self.pp = parallel.pp
        self.stage_size = parallel.stage_size
        self.world_size = parallel.world_size
        self.step_timeout_s = step_timeout_s
        self._freed: list[str] = []  # finished since the last step: freed with the next
        self.workers: list[Any] = []
        self.placement_group: Any = None
        self._owns_ray = connect_ray(address)
        try:
            self._start(placement_strategy, num_cpus_per_worker, start_timeout_s)
            infos = self._get([w.load_model.remote() for w in self.workers], load_timeout_s, "load")
        except BaseException:
            self.shutdown()
            raise
        self._info: RuntimeInfo = infos[0]

    @property
    def info(self) -> RuntimeInfo:
        return self._info

    def _bundle(self, num_cpus: float | None) -> dict[str, float]:
        import ray

        if num_cpus is None:
            # One core per rank where the cluster has them, else an equal share.
            num_cpus = min(1.0, float(ray.cluster_resources().get("CPU", 1.0)) / self.world_size)
        bundle = {"CPU": num_cpus}
        if self.config.device.startswith("cuda"):
            bundle["GPU"] = 1.0
        return bundle

    def _start(self, strategy: str, num_cpus: float | None, timeout_s: float) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self._bundle(num_cpus)
        self.placement_group = placement_group([bundle] * self.world_size, strategy=strategy)
        try:
            ray.get(self.placement_group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(
                f"placement group of {self.world_size} bundles {bundle} ({strategy}) was not "
                f"placed within {timeout_s}s; available: {ray.available_resources()}"
            ) from e
        # The KV-transfer methods run in their own concurrency group (kvtransfer.worker),
        # so a transfer never waits for a step of the same worker, nor a step for it.
        actor = remote_class(Worker)
        self.workers = [
            actor.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0.0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=rank
                ),
                # Fewer malloc arenas: gRPC KV pulls from many threads otherwise run at
                # half speed until glibc has grown one arena per thread.
                # BLAS_ENV: see engine/gemv.py.
                runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "2", **BLAS_ENV}},
            ).remote(self.config)
            for rank in range(self.world_size)
        ]
        ready = self._get([w.ready.remote() for w in self.workers], timeout_s, "ready")
        addr, port = rendezvous(ready)
        self._get(
            [
                w.init_process_group.remote(addr, port, rank, self.world_size, timeout_s, self.tp)
                for rank, w in enumerate(self.workers)
            ],
            timeout_s,
            "init_process_group",
        )

    def _get(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        import ray

        try:
            return list(ray.get(refs, timeout=timeout_s))
        except ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(
                f"{what} on {len(refs)} workers did not finish within {timeout_s}s"
            ) from e

    def _submit(self, steps: list[SeqStep]) -> list[Any]:
        import ray

        ref = ray.put(steps)  # serialized once, read by every rank
        m = self.config.parallel.microbatches
        freed, self._freed = self._freed, []
        return [w.execute.remote(ref, m, freed) for w in self.workers]

    def execute(self, steps: list[SeqStep]) -> SamplerOutput:
        """Sends one step to every rank at once (collective) and returns the samples of
        the last stage's TP rank 0. With pp > 1 each rank cuts the step into
        ``pp_microbatches`` (``engine.pipeline.split_microbatches``). Raises
        TimeoutError after ``step_timeout_s``."""
        return self._sampled(self._get(self._submit(steps), self.step_timeout_s, "execute"))

    async def execute_async(self, steps: list[SeqStep]) -> SamplerOutput:
        """``execute`` awaited on the event loop (same timeout, same result)."""
        refs = self._submit(steps)
        try:
            outs = await asyncio.wait_for(asyncio.gather(*refs), self.step_timeout_s)
        except TimeoutError as e:
            raise TimeoutError(
                f"execute on {len(refs)} workers did not finish within {self.step_timeout_s}s"
            ) from e
        return self._sampled(list(outs))

    def _sampled(self, outs: list[Any]) -> SamplerOutput:
        sampler_rank = (self.pp - 1) * self.stage_size
        out = outs[sampler_rank]
        if not isinstance(out, SamplerOutput):
            raise RuntimeError(
                f"rank {sampler_rank} returned {type(out).__name__}, not SamplerOutput"
            )
        return out

    def free(self, request_ids: list[str]) -> None:
        """Forgets finished requests on every rank, with the next step (``Worker.execute``
        frees them first): no call of its own. A blocking call here stalled the
        controller's event loop for a Ray round trip (~2 ms) at every request's first
        token and at every finish."""
        self._freed.extend(request_ids)

    def stats(self) -> list[dict[str, Any]]:
        """Every rank's counters (``Worker.stats``), in rank order."""
        return self._get([w.stats.remote() for w in self.workers], self.step_timeout_s, "stats")

    def stage_utilisation(self, since: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Per stage: busy seconds (forward compute of its TP rank 0) over the pipeline's
        wall seconds (the last stage's, which starts with the others and ends last),
        next to the ideal m / (m + s - 1) of ``m`` micro-batches over ``s`` stages.
        ``since`` (an earlier ``stats()``) restricts it to the steps run after that."""
        now = self.stats()
        m, s = self.config.parallel.microbatches, self.pp

        def delta(rank: int, key: str) -> float:
            return float(now[rank][key]) - (float(since[rank][key]) if since else 0.0)

        w = self.stage_size
        wall = delta((s - 1) * w, "wall_s")
        return [
            {
                "stage": stage,
                "busy_s": delta(stage * w, "busy_s"),
                "wall_s": wall,
                "utilisation": delta(stage * w, "busy_s") / wall if wall else 0.0,
                "ideal": m / (m + s - 1),
            }
            for stage in range(s)
        ]

    def shutdown(self) -> None:
        """Kills the workers and removes the placement group; idempotent. Waits at most
        a few seconds for ranks to leave their process group cleanly."""
        import ray

        if self.workers:
            # A dead or stuck rank raises here: killing it below is the cure.
            with contextlib.suppress(Exception):
                ray.get([w.shutdown.remote() for w in self.workers], timeout=5.0)
            for w in self.workers:
                ray.kill(w)
            self.workers = []
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def rendezvous(ready: list[dict[str, Any]]) -> tuple[str, int]:
    """The process group's master address: rank 0's host, by loopback when every rank
    shares it, and a port rank 0 found free there (the driver may be elsewhere)."""
    same_host = len({r["node_ip"] for r in ready}) == 1
    addr = "127.0.0.1" if same_host else str(ready[0]["node_ip"])
    return addr, int(ready[0]["free_port"])
