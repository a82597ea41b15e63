"""A colocated deployment (``prefill.num_instances: 0``): the decode instances prefill
and decode every request themselves. Greedy tokens equal the single-instance tokens
with and without chunked prefill, on one and two instances, under every policy; an
abort in any phase frees its blocks; GetServerInfo and the CLI describe it truly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.loadgen import server_workers
from engine.sampling_params import SamplingParams
from router import api
from router.cli import build_parser
from router.cli_serve import serve_config
from router.config import PoolConfig, RouterConfig, ServeConfig
from router.controller import ClusterOutput, Controller
from tests.router.test_disaggregated import PROMPTS, assert_clean, collect, reference

EXAMPLE = Path(__file__).parents[2] / "examples" / "colocated.yaml"
BUDGET = 16  # tokens per step with chunked prefill: the longer prompts take several


def colocated(
    model: Path, instances: int, chunked: bool, policy: str, profile: bool = False
) -> ServeConfig:
    budget = BUDGET if chunked else 64
    return ServeConfig(
        model=str(model),
        dtype="float32",
        prefill=PoolConfig(num_instances=0),
        decode=PoolConfig(
            num_instances=instances,
            num_blocks=48,
            num_threads=1,
            num_cpus_per_worker=0.25,
            max_num_batched_tokens=budget,
            chunked_prefill=chunked,
        ),
        router=RouterConfig(policy=policy, profile_at_start=profile),
    )


@pytest.mark.parametrize(
    ("instances", "chunked", "policy"),
    [(1, True, "round_robin"), (2, True, "least_loaded"), (2, False, "slo_aware")],
)
def test_tokens_equal_single_instance(
    tiny_llama: Path, ray_cluster: None, instances: int, chunked: bool, policy: str
) -> None:
    cfg = colocated(tiny_llama, instances, chunked, policy)
    assert max(map(len, PROMPTS)) > BUDGET  # chunked: some prompts really chunk

    async def run() -> None:
        async with Controller(cfg) as c:
            assert c.prefill == [] and c._pools is not None and c._pools.transport is None
            outs = await asyncio.gather(*(collect(c, p) for p in PROMPTS))
            assert [o.output.token_ids for o in outs] == reference(tiny_llama, PROMPTS)
            names = {f"colocated-{i}" for i in range(instances)}
            for o in outs:
                assert o.prefill_instance == o.decode_instance and o.transfer is None
                t = o.timings
                assert t["arrived"] <= t["prefill_start"] <= t["first_token"]
                assert t["first_token"] == t["transfer_start"] == t["transfer_end"]
                assert t["transfer_end"] == t["decode_start"] <= t["finished"]
                timings = api.final_result(o).timings
                assert timings.transfer_ms == 0 and timings.transfer_bytes == 0
            if policy != "slo_aware":  # the baselines spread a burst deterministically
                assert {o.decode_instance for o in outs} == names
            assert set(c.stats()) == names
            assert_clean(c)

    asyncio.run(run())


def test_abort_in_each_phase_frees_blocks(tiny_llama: Path, ray_cluster: None) -> None:
    cfg = colocated(tiny_llama, 1, True, "slo_aware", profile=True)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def drain(stream: AsyncIterator[ClusterOutput]) -> list[ClusterOutput]:
        return [u async for u in stream]

    async def run() -> None:
        async with Controller(cfg) as c:
            # Profiled on prefill as well: a colocated instance prefills.
            assert c.router.models["colocated-0"].prefill.num_observed > 0
            queued = asyncio.create_task(drain(c.generate(list(range(100, 150)), params, "q")))
            await asyncio.sleep(0)  # admitted, not prefilled yet
            assert c.abort("q") and not c.abort("gone")
            decoding = c.generate(list(range(3, 10)), params, "d")
            assert not (await anext(decoding)).finished  # the first token: now decoding
            assert c.abort("d")
            for last in ((await queued)[-1], (await drain(decoding))[-1]):
                assert last.finished and last.output.finish_reason == "abort"
            assert_clean(c)

    asyncio.run(run())


def test_server_info_counts_the_colocated_workers() -> None:
    cfg = ServeConfig.from_yaml(EXAMPLE).with_overrides(**{"decode.tp": 2})
    info = api.server_info(cfg, "m", 128)
    assert [(p.role, p.num_instances, p.tp, p.pp) for p in info.pools] == [("colocated", 2, 2, 1)]
    assert server_workers(info) == 4 and info.transport == "none"


def test_serve_flag_colocated() -> None:
    args = build_parser().parse_args(["serve", "--model", "m", "--colocated"])
    cfg = serve_config(args)
    assert cfg.colocated and cfg.decode.num_instances == 1
    bad = build_parser().parse_args(
        ["serve", "--model", "m", "--colocated", "--prefill-instances", "2"]
    )
    with pytest.raises(
        ValueError, match="--colocated runs no prefill instance; got --prefill-instances 2"
    ):
        serve_config(bad)
