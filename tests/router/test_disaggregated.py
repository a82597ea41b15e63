"""Disaggregated serving end to end: the greedy tokens of prefill → KV transfer → decode
equal the single-instance tokens for every layout pair and transport (DESIGN.md
invariant 1), with concurrent requests of different lengths and prefix-cache hits, and
no block is left behind (invariant 3)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig
from engine.sampling_params import SamplingParams
from router.config import KVTransferConfig, PoolConfig, RouterConfig, ServeConfig
from router.controller import ClusterOutput, Controller

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SHARED = list(range(5, 45))  # 40 tokens: two full blocks shared by the prefix prompts
PROMPTS: list[list[int]] = [
    list(range(3, 10)),
    list(range(100, 150)),  # spans 4 blocks
    [7],
    list(range(200, 233)),
]
PREFIX_PROMPTS = [[*SHARED, 300, 301], [*SHARED, 400]]
# prefill (tp, pp) → decode (tp, pp)
PAIRS = {
    "1-1": ((1, 1), (1, 1)),
    "tp2-1": ((2, 1), (1, 1)),
    "1-tp2": ((1, 1), (2, 1)),
    "tp2-pp2": ((2, 1), (1, 2)),
    "pp2-tp2": ((1, 2), (2, 1)),
}


def serve_config(
    model: Path, pair: str, transport: str, lease_s: float = 30.0, profile: bool = False
) -> ServeConfig:
    (ptp, ppp), (dtp, dpp) = PAIRS[pair]
    pool = {"num_blocks": 48, "num_threads": 1, "num_cpus_per_worker": 0.25}
    return ServeConfig(
        model=str(model),
        dtype="float32",
        prefill=PoolConfig(tp=ptp, pp=ppp, max_num_batched_tokens=64, **pool),  # type: ignore[arg-type]
        decode=PoolConfig(tp=dtp, pp=dpp, **pool),  # type: ignore[arg-type]
        kv=KVTransferConfig(transport=transport, lease_s=lease_s, transfer_timeout_s=20.0),
        router=RouterConfig(profile_at_start=profile),
    )


def reference(model: Path, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(EngineConfig(model=str(model), dtype="float32", cache=CacheConfig(num_blocks=64)))
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


async def collect(controller: Controller, prompt: list[int]) -> ClusterOutput:
    last = None
    async for update in controller.generate(prompt, GREEDY):
        last = update
    assert last is not None and last.finished
    return last


def assert_clean(controller: Controller) -> None:
    controller.check_invariants()
    for name, s in controller.stats().items():
        assert s["blocks_used"] == 0, (name, s)
        assert s.get("leased", 0) == 0 and s.get("pending", 0) == 0, (name, s)


async def run_pair(model: Path, pair: str, transport: str) -> list[ClusterOutput]:
    async with Controller(serve_config(model, pair, transport)) as c:
        outs = await asyncio.gather(*(collect(c, p) for p in PROMPTS))
        # One after the other, so that the second finds the first's prefix cached.
        for p in PREFIX_PROMPTS:
            outs.append(await collect(c, p))
        assert_clean(c)
        if transport == "local":  # after the first transfers, no actor call per transfer
            bells = c._pools.transport._bells  # type: ignore[union-attr]
            assert bells and all(b is not None for b in bells.values())
        return outs


@pytest.mark.parametrize("transport", ["gloo", "grpc", "local"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_tokens_equal_single_instance(
    tiny_llama: Path, ray_cluster: None, pair: str, transport: str
) -> None:
    outs = asyncio.run(run_pair(tiny_llama, pair, transport))
    assert [o.output.token_ids for o in outs] == reference(tiny_llama, PROMPTS + PREFIX_PROMPTS)
    for o in outs:
        assert o.transfer is not None and o.transfer.ok, o.transfer
        assert o.transfer.transport == transport
        t = o.timings
        assert t["arrived"] <= t["first_token"] <= t["transfer_start"] <= t["transfer_end"]
        assert t["transfer_end"] <= t["finished"]
    prefix_hit = outs[-1]
    assert prefix_hit.output.num_cached_tokens == 32  # prefill reused the shared blocks
    assert prefix_hit.transfer is not None and prefix_hit.transfer.num_cached_blocks == 2
    assert prefix_hit.transfer.num_blocks == 1  # only the last, unshared block moved


@pytest.mark.parametrize(("pair", "connect"), [("tp2-1", True), ("1-1", False)])
def test_channels_open_at_start_unless_told_not_to(
    tiny_llama: Path, ray_cluster: None, pair: str, connect: bool
) -> None:
    """With ``kv.connect_at_start`` every (prefill rank, decode rank) channel is open
    before the first request (for local: the pool mapped and the doorbell rung, no actor
    call left for its transfer); without, the first transfer opens it."""
    cfg = serve_config(tiny_llama, pair, "local")
    cfg = dataclasses.replace(cfg, kv=dataclasses.replace(cfg.kv, connect_at_start=connect))

    async def run() -> None:
        async with Controller(cfg) as c:
            bells = c._pools.transport._bells  # type: ignore[union-attr]
            assert len(bells) == (2 if connect else 0)  # TP2 -> TP1: two rank pairs
            assert all(b is not None for b in bells.values())
            out = await collect(c, PROMPTS[1])
            assert out.transfer is not None and out.transfer.ok
            assert len(bells) == (2 if connect else 1)
            assert_clean(c)

    asyncio.run(run())


def test_seeded_sampling_continues_after_the_handoff(tiny_llama: Path, ray_cluster: None) -> None:
    """A seeded request samples its first token on the prefill instance and the rest on
    the decode instance; its tokens equal the single instance's, which draws every one
    from one generator (the decode side skips the draw the prefill side made)."""
    params = [
        SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, ignore_eos=True, seed=s)
        for s in (1, 2, 3, 4)
    ]
    llm = LLM(
        EngineConfig(model=str(tiny_llama), dtype="float32", cache=CacheConfig(num_blocks=64))
    )
    want = [o.token_ids for o in llm.generate(PROMPTS, params)]

    async def run() -> list[list[int]]:
        async with Controller(serve_config(tiny_llama, "1-1", "local")) as c:
            outs = await asyncio.gather(
                *(_collect(c, p, sp) for p, sp in zip(PROMPTS, params, strict=True))
            )
            assert_clean(c)
            return outs

    assert asyncio.run(run()) == want


async def _collect(controller: Controller, prompt: list[int], params: SamplingParams) -> list[int]:
    last = None
    async for update in controller.generate(prompt, params):
        last = update
    assert last is not None and last.finished and last.transfer is not None
    return list(last.output.token_ids)
