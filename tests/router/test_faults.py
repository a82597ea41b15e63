"""Faults and aborts in a disaggregated deployment: nothing leaks (DESIGN.md
invariant 3) and surviving requests keep their exact tokens."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from engine.sampling_params import SamplingParams
from router.controller import Controller
from tests.router.test_disaggregated import (
    GREEDY,
    assert_clean,
    collect,
    reference,
    serve_config,
)

LONG = list(range(10, 60))


async def wait_until(cond: object, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.002)


def test_unpulled_lease_expires_and_decode_recomputes(tiny_llama: Path, ray_cluster: None) -> None:
    """The decode instance holds one request at a time, so the second handoff waits
    past its lease: the prefill side frees its blocks, and the decode side, finding the
    lease gone, recomputes the prompt itself with the same tokens."""
    cfg = serve_config(tiny_llama, "1-1", "grpc", lease_s=0.3)
    cfg = replace(cfg, decode=replace(cfg.decode, max_num_seqs=1))
    slow = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)

    async def run() -> tuple[list[int], list[int], dict[str, dict[str, int]]]:
        async with Controller(cfg) as c:
            first = asyncio.create_task(_tokens(c, LONG, slow))
            second = asyncio.create_task(_tokens(c, [3, 4, 5, 6], GREEDY))
            a, b = await first, await second
            stats = c.stats()
            assert_clean(c)
            return a, b, stats

    a, b, stats = asyncio.run(run())
    assert stats["prefill-0"]["leases_expired"] >= 1
    assert stats["decode-0"]["recomputed"] >= 1
    ref_long = reference(tiny_llama, [LONG])  # 12 tokens: a prefix of the 40
    assert a[:12] == ref_long[0]
    assert b == reference(tiny_llama, [[3, 4, 5, 6]])[0]


async def _tokens(c: Controller, prompt: list[int], params: SamplingParams) -> list[int]:
    last = None
    async for update in c.generate(prompt, params):
        last = update
    assert last is not None
    return last.output.token_ids


def test_abort_during_transfer_frees_both_sides(tiny_llama: Path, ray_cluster: None) -> None:
    # gloo's first transfer sets up the pair's process group (~1 s): the window to abort.
    cfg = serve_config(tiny_llama, "1-1", "gloo")

    async def run() -> None:
        async with Controller(cfg) as c:
            decode = c.decode[0]
            gen = c.generate(LONG, GREEDY, request_id="victim")
            first = await gen.__anext__()  # the first token: prefill is done
            assert first.output.token_ids and not first.finished
            await wait_until(lambda: "victim" in decode.transferring)
            await gen.aclose()  # the client goes away mid-transfer
            await wait_until(lambda: not decode.transferring)
            await asyncio.sleep(0.05)
            assert_clean(c)
            # The deployment still serves, token for token.
            out = await collect(c, LONG)
            assert out.output.token_ids == reference(tiny_llama, [LONG])[0]
            assert_clean(c)

    asyncio.run(run())


def test_client_cancel_in_every_phase(tiny_llama: Path, ray_cluster: None) -> None:
    cfg = serve_config(tiny_llama, "1-1", "local")
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def run() -> None:
        async with Controller(cfg) as c:
            # queued at prefill: never iterated
            gen = c.generate(LONG, params, request_id="queued")
            task = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await gen.aclose()
            # decoding: after a few tokens
            gen = c.generate(LONG, params, request_id="decoding")
            async for update in gen:
                if len(update.output.token_ids) >= 5:
                    break
            await gen.aclose()
            await asyncio.sleep(0.2)  # let the loops finish the step in flight
            assert c.abort("decoding") is False  # already gone
            assert_clean(c)

    asyncio.run(run())


def test_bad_prompt_rejected_before_anything_runs(tiny_llama: Path, ray_cluster: None) -> None:
    cfg = serve_config(tiny_llama, "1-1", "local")

    async def run() -> None:
        async with Controller(cfg) as c:
            for bad, msg in [([], "prompt is empty"), ([10**6], "outside the vocabulary")]:
                try:
                    await collect(c, bad)
                except ValueError as e:
                    assert msg in str(e)
                else:
                    raise AssertionError(f"{bad} was accepted")
            assert_clean(c)

    asyncio.run(run())


def test_prefill_full_of_leases_waits_instead_of_failing(
    tiny_llama: Path, ray_cluster: None
) -> None:
    """Prefill holds 8 blocks (two 50-token prompts under lease fill it) and decode
    takes one request at a time: later prompts wait at prefill for acks, and every
    request still finishes with the single-instance tokens."""
    cfg = serve_config(tiny_llama, "1-1", "local")
    cfg = replace(
        cfg,
        prefill=replace(cfg.prefill, num_blocks=8),
        decode=replace(cfg.decode, max_num_seqs=1),
    )
    prompts = [list(range(10 + i, 60 + i)) for i in range(4)]

    async def run() -> list[list[int]]:
        async with Controller(cfg) as c:
            outs = await asyncio.gather(*(collect(c, p) for p in prompts))
            assert c.stats()["decode-0"]["recomputed"] == 0  # no lease ran out
            assert_clean(c)
            return [o.output.token_ids for o in outs]

    assert asyncio.run(run()) == reference(tiny_llama, prompts)
