"""The prefill instance in-process: first tokens, handoffs, leases, aborts."""

from __future__ import annotations

from pathlib import Path

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.sampling_params import SamplingParams
from prefill.instance import PrefillInstance

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = ["Hello there, how are you", "The quick brown fox jumps over the lazy dog", "zebra"]


def config(path: Path, num_blocks: int = 32, budget: int = 2048) -> EngineConfig:
    return EngineConfig(
        model=str(path),
        dtype="float32",
        num_threads=2,
        cache=CacheConfig(num_blocks=num_blocks, block_size=16),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget),
    )


def run_all(inst: PrefillInstance) -> dict[str, list[int]]:
    firsts: dict[str, list[int]] = {}
    while inst.has_work():
        for out in inst.step():
            firsts[out.request_id] = out.token_ids
    return firsts


def test_first_tokens_match_colocated_and_leases_hold_blocks(tiny_llama: Path) -> None:
    ref = LLM(config(tiny_llama)).generate(PROMPTS, GREEDY)
    inst = PrefillInstance(config(tiny_llama, budget=8), lease_s=60.0)  # chunked prompts
    rids = [inst.add_request(p, GREEDY) for p in PROMPTS]
    firsts = run_all(inst)
    assert [firsts[r] for r in rids] == [o.token_ids[:1] for o in ref]
    handoffs = inst.take_handoffs()
    assert [h.request_id for h in handoffs] == rids
    for h, o in zip(handoffs, ref, strict=True):
        assert h.first_token == o.token_ids[0]
        assert len(h.block_ids) == -(-len(o.prompt_token_ids) // 16)
    bm = inst.block_manager
    assert bm.stats().used == sum(len(h.block_ids) for h in handoffs)
    bm.check_invariants(inst.live_sequences())
    assert inst.release(rids[0]) and not inst.release(rids[0])
    assert inst.abort(rids[1])
    assert inst.expire_leases(now=handoffs[2].lease_deadline) == [rids[2]]
    assert bm.stats().used == 0
    bm.check_invariants([])


def test_claim_keeps_lease_past_its_deadline(tiny_llama: Path) -> None:
    inst = PrefillInstance(config(tiny_llama), lease_s=1.0)
    rid = inst.add_request(PROMPTS[0], GREEDY)
    run_all(inst)
    (h,) = inst.take_handoffs()
    assert inst.claim(rid, hold_s=30.0)
    assert inst.expire_leases(now=h.lease_deadline) == []
    assert inst.release(rid)
    inst.block_manager.check_invariants([])


def test_request_done_at_first_token_leaves_no_handoff(tiny_llama: Path) -> None:
    inst = PrefillInstance(config(tiny_llama))
    rid = inst.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=1))
    outs = inst.step()
    assert outs[0].request_id == rid and outs[0].finished
    assert outs[0].finish_reason == "length"
    assert inst.take_handoffs() == [] and len(inst.leases) == 0
    inst.block_manager.check_invariants([])


def test_prefix_reuse_across_requests(tiny_llama: Path) -> None:
    inst = PrefillInstance(config(tiny_llama))
    long = list(range(3, 43))  # 40 tokens: two full blocks get cached
    inst.add_request(long, GREEDY, "a")
    run_all(inst)
    inst.release("a")
    inst.add_request([*long[:32], 7, 8], GREEDY, "b")
    run_all(inst)
    (_, hb) = inst.take_handoffs()
    assert hb.num_cached_tokens == 32


def test_abort_while_queued(tiny_llama: Path) -> None:
    inst = PrefillInstance(config(tiny_llama))
    rid = inst.add_request(PROMPTS[0], GREEDY)
    assert inst.abort(rid) and not inst.has_work()
    assert not inst.abort(rid)
    inst.block_manager.check_invariants([])
