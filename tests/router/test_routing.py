"""The router inside a running deployment: admission rejects what cannot meet its
SLO, conditional disaggregation prefills short prompts on the decode instance, load
spreads over several instances, and the latency models learn from every step."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from router.config import RouterConfig
from router.controller import Controller, SLOUnattainable
from tests.router.test_disaggregated import (
    GREEDY,
    assert_clean,
    collect,
    reference,
    serve_config,
)


def test_reject_when_no_pair_can_meet_the_slo(tiny_llama: Path, ray_cluster: None) -> None:
    cfg = serve_config(tiny_llama, "1-1", "local", profile=True)
    cfg = replace(cfg, router=replace(cfg.router, on_slo_miss="reject"))

    async def run() -> None:
        async with Controller(cfg) as c:
            with pytest.raises(SLOUnattainable, match="rejected"):
                async for _ in c.generate(list(range(3, 40)), GREEDY, slo=(1e-6, 1e-6)):
                    pass
            # A reachable SLO is admitted and served, token for token.
            out = await collect(c, list(range(3, 40)))
            assert out.output.token_ids == reference(tiny_llama, [list(range(3, 40))])[0]
            models = c.router.models
            assert models["prefill-0"].prefill.num_observed > 0  # profiled + online
            assert models["decode-0"].decode.num_observed > 0
            assert_clean(c)

    asyncio.run(run())


def test_short_prompt_prefills_on_the_decode_instance(tiny_llama: Path, ray_cluster: None) -> None:
    cfg = serve_config(tiny_llama, "1-1", "gloo", profile=True)
    cfg = replace(cfg, router=RouterConfig(local_prefill_max_tokens=64))
    prompt = [5, 6, 7, 8]

    async def run() -> None:
        async with Controller(cfg) as c:
            out = await collect(c, prompt)
            assert out.prefill_instance == "decode-0" and out.transfer is None
            assert out.output.token_ids == reference(tiny_llama, [prompt])[0]
            t = out.timings
            assert t["arrived"] <= t["prefill_start"] <= t["first_token"] <= t["finished"]
            assert_clean(c)

    asyncio.run(run())


@pytest.mark.parametrize("policy", ["least_loaded", "slo_aware"])
def test_load_spreads_over_instances(tiny_llama: Path, ray_cluster: None, policy: str) -> None:
    cfg = serve_config(tiny_llama, "1-1", "grpc")
    cfg = replace(
        cfg,
        prefill=replace(cfg.prefill, num_instances=2),
        decode=replace(cfg.decode, num_instances=2),
        router=RouterConfig(policy=policy, profile_at_start=False),
    )
    prompts = [list(range(10 + i, 60 + i)) for i in range(4)]

    async def run() -> None:
        async with Controller(cfg) as c:
            outs = await asyncio.gather(*(collect(c, p) for p in prompts))
            assert [o.output.token_ids for o in outs] == reference(tiny_llama, prompts)
            assert {o.prefill_instance for o in outs} == {"prefill-0", "prefill-1"}
            assert {o.decode_instance for o in outs} == {"decode-0", "decode-1"}
            assert_clean(c)

    asyncio.run(run())
