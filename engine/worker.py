"""One rank of one instance: a plain class that Ray runs as an actor (engine/executor.py).

Every rank holds its shard of the model and of the KV cache and runs every step's
forward, because the collectives inside it (two all-reduces per layer, one for the
vocab-parallel embedding, one all-gather of the logits) must be entered by all ranks.
Only the last stage's first rank samples: the LM head all-gathers the logits, so it
already holds them whole, and the block manager and the sampler state live with the
driver's view of that rank.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.expert_parallel import expert_load, expert_range
from engine.memory import host_memory_bytes, num_kv_blocks
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, RuntimeInfo, SeqStep
from engine.parallel import ParallelContext
from engine.pipeline import (
    Stage,
    StageTimer,
    run_stage,
    split_microbatches,
    stage_of,
    tp_group_ranks,
)
from engine.sampler import SamplerOutput
from kvtransfer.blocks import KVView
from kvtransfer.layout import KVLayout
from kvtransfer.worker import KVTransferMixin


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Worker(KVTransferMixin):
    """One tensor-parallel rank; its KV blocks move to and from other instances'
    ranks through ``KVTransferMixin``'s methods. Call order: ``ready`` → ``init_process_group`` (all
    ranks at once) → ``load_model`` (all ranks at once) → ``execute``/``free`` (all
    ranks, same arguments, same order) → ``shutdown``."""

    def __init__(self, config: EngineConfig):
        # Explicit threads: Ray's default OMP_NUM_THREADS follows num_cpus, and several
        # ranks sharing a machine must not oversubscribe its cores.
        torch.set_num_threads(config.num_threads or 1)
        if config.device.startswith("cuda"):
            # Ray sets CUDA_VISIBLE_DEVICES to the one GPU of this actor's bundle.
            config = replace(config, device="cuda:0")
        self.config = config
        self.pc = ParallelContext()
        self.stage = Stage(0, 1, 0, 1)
        self.runner: ModelRunner | None = None
        self.num_steps = 0
        self.timer = StageTimer()

    def ready(self) -> dict[str, Any]:
        """Returns as soon as the actor process is up (the executor waits on it with a
        timeout): pid, node ip, a free port on this host (rank 0's becomes the
        rendezvous when ranks span hosts), torch threads and device."""
        return {
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "free_port": free_port("0.0.0.0"),
            "num_threads": torch.get_num_threads(),
            "device": self.config.device,
        }

    def init_process_group(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        timeout_s: float = 60.0,
        tp: int | None = None,
    ) -> None:
        """Joins this instance's process group (gloo on CPU, NCCL on CUDA) by a TCP
        rendezvous at ``master_addr:master_port``. Blocks until all ``world_size`` ranks
        joined; raises after ``timeout_s`` (later collectives and pipeline sends use the
        same timeout). ``tp`` (default: world_size) ranks form each TP group and
        max(tp, ep) ranks each pipeline stage; unless the world is one TP group, every
        rank also creates every TP group (and with ep > tp every stage's MoE group)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        tp = world_size if tp is None else tp
        width = max(tp, self.config.parallel.ep)
        if tp < 1 or width % tp or world_size % width:
            raise ValueError(
                f"tp={tp}, ep={self.config.parallel.ep} do not tile world_size={world_size}"
            )
        backend = "nccl" if self.config.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        boundaries = self.config.parallel.pp_boundaries
        self.stage = stage_of(rank, width, world_size // width, boundaries)
        self.pc = self._context(rank, tp, width)

    def _context(self, rank: int, tp: int, width: int) -> ParallelContext:
        """This rank's TP group (consecutive ranks: group ``rank // tp``) and, when the
        stage is wider than tp (ep > tp), the stage's MoE group of all its ranks."""
        ep, stage = self.config.parallel.ep, self.stage
        if stage.pp_size == 1 and width == tp:
            return ParallelContext(rank, tp, dist.group.WORLD, ep_size=ep)
        # new_group is collective over the world: every rank creates every group, in
        # order. Groups of one rank are never used (no collective at tp=1): not made.
        layout = tp_group_ranks(tp, stage.pp_size, width) if tp > 1 else []
        tp_groups = [dist.new_group(ranks) for ranks in layout]
        group = tp_groups[rank // tp] if tp_groups else None
        if width == tp:
            return ParallelContext(stage.tp_rank, tp, group, ep_size=ep)
        moe_groups = [dist.group.WORLD]
        if stage.pp_size > 1:
            stages = [list(range(s * width, (s + 1) * width)) for s in range(stage.pp_size)]
            moe_groups = [dist.new_group(ranks) for ranks in stages]
        return ParallelContext(
            stage.tp_rank % tp,
            tp,
            group,
            ep_size=ep,
            moe_size=width,
            moe_rank=stage.tp_rank,
            moe_group=moe_groups[stage.pp_rank],
        )

    def load_model(self) -> RuntimeInfo:
        """Builds this rank's shard of the model (reading only its slices of the
        checkpoint) and its KV cache; collective: every rank must call it. All ranks
        end with the same number of KV blocks (the minimum of what each could hold),
        since the driver's block manager hands out one block id space for all."""
        model_cfg = ModelConfig.from_pretrained(self.config.model)
        parallel = replace(self.config.parallel, tp=self.pc.tp_size, pp=self.stage.pp_size)
        parallel.check_model(model_cfg)
        config = replace(self.config, parallel=parallel)
        layers = self.stage.layers(model_cfg.num_layers)
        if config.cache.num_blocks is not None:
            self.runner = ModelRunner(config, model_cfg, self.pc, layers)
            return self.runner.info
        # Load with a one-block cache, then size the pool from what is left after the
        # weights, agreeing on the smallest count over ranks.
        one_block = replace(config, cache=replace(config.cache, num_blocks=1))
        runner = ModelRunner(one_block, model_cfg, self.pc, layers)
        local = num_kv_blocks(
            model_cfg,
            config.cache,
            runner.info.dtype,
            self._free_bytes(),
            self.pc.tp_size,
            num_layers=len(layers),
        )
        runner.resize_kv(self._min_over_ranks(local))
        self.runner = runner
        return runner.info

    def _free_bytes(self) -> int:
        """Memory this rank may size its pool from: its GPU's free memory, or on CPU an
        equal share of the host's RAM (the ranks of a STRICT_PACK instance share it, so
        the instance takes ``memory_fraction`` of the host whatever its tp)."""
        if self.config.device.startswith("cuda"):
            return int(torch.cuda.mem_get_info()[0])
        return host_memory_bytes() // (self.stage.tp_size * self.stage.pp_size)

    def _min_over_ranks(self, value: int) -> int:
        """The minimum of ``value`` over every rank of every stage (one block id space)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.config.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _require_runner(self) -> ModelRunner:
        if self.runner is None:
            raise RuntimeError("load_model() must run before execute/free/stats")
        return self.runner

    def execute(
        self, steps: list[SeqStep], num_microbatches: int = 1, freed: Sequence[str] = ()
    ) -> SamplerOutput | None:
        """Runs one step's forward on this rank; collective: every rank gets the same
        ``steps``. Rank 0 samples and returns the tokens; other ranks return None. A
        rank that never enters makes the others fail after the group's timeout.
        ``freed``: requests finished since the last step, forgotten first (as ``free``).

        With several pipeline stages the step is cut into ``num_microbatches`` (the
        same cut on every rank) that flow through the stages; the last stage's TP rank
        0 samples and returns the tokens in the order of ``steps``."""
        runner = self._require_runner()
        if freed:
            runner.free(list(freed))
        self.num_steps += 1
        if self.stage.pp_size > 1:
            microbatches = split_microbatches(steps, num_microbatches)
            return run_stage(runner, self.stage, microbatches, self.timer)
        if self.stage.tp_rank == 0:  # the stage's first rank (of its first TP replica)
            return runner.execute(steps)
        runner.model(runner.build_batch(steps), runner.kv_caches)
        return None

    def kv_view(self) -> KVView:
        """This rank's KV cache with the global layers and KV heads it holds."""
        runner = self._require_runner()
        cfg, stage = runner.model.config, self.stage
        layout = KVLayout(self.pc.tp_size, stage.pp_size, stage.boundaries, stage.tp_size)
        rank = stage.pp_rank * stage.tp_size + stage.tp_rank
        heads = layout.kv_heads_of(rank, cfg.num_kv_heads)
        return KVView(runner.kv_caches, runner.layers, heads, runner.kv_arena)

    def free(self, request_ids: list[str]) -> None:
        """Forgets per-request state of finished requests (local; no collective)."""
        self._require_runner().free(request_ids)

    def stats(self) -> dict[str, Any]:
        """Counters since load (local): steps run, requests whose state it holds,
        collectives entered, this stage's layers and KV pool (blocks, bytes per block),
        pipeline busy/wall seconds, and tokens routed to each expert (summed over MoE
        layers; empty for dense models)."""
        runner = self._require_runner()
        cfg = runner.model.config
        moe: dict[str, Any] = {}
        if cfg.num_experts > 0:
            load = expert_load(runner.model, self.pc.ep_size)
            moe = {
                "tokens_per_expert": load.tokens_per_expert,
                "expert_hotspot_ratio": load.hotspot_ratio,
            }
        return {
            **moe,
            "ep_size": self.pc.ep_size,
            "ep_rank": self.pc.ep_rank,
            "experts": list(expert_range(cfg.num_experts, self.pc.ep_size, self.pc.ep_rank))
            if cfg.num_experts
            else [],
            "rank": self.stage.pp_rank * self.stage.tp_size + self.stage.tp_rank,
            "tp_rank": self.pc.tp_rank,
            "tp_size": self.pc.tp_size,
            "pp_rank": self.stage.pp_rank,
            "pp_size": self.stage.pp_size,
            "layers": list(runner.layers),
            "kv_layers": len(runner.kv_caches),
            "kv_block_bytes": sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
            // max(1, runner.info.num_blocks),
            "num_steps": self.num_steps,
            "num_requests": len(runner.block_tables),  # per-request state held here
            "num_all_reduces": self.pc.num_all_reduces,
            "num_all_gathers": self.pc.num_all_gathers,
            "num_blocks": runner.info.num_blocks,
            "num_threads": torch.get_num_threads(),
            **self.timer.as_dict(),
        }

    def shutdown(self) -> None:
        """Closes the KV transports (servers, pair groups, shared memory) and leaves the
        process group (local; the executor then kills the actor)."""
        self.close_transports()
        if dist.is_initialized():
            dist.destroy_process_group()


def _node_ip() -> str:
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # outside Ray (unit use): the loopback is the only address we know
        return "127.0.0.1"
