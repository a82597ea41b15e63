"""The shared-memory KV pool: another mapping sees the same bytes, retiring is seen
by peers, and an engine whose pool is shared generates the same tokens."""

from __future__ import annotations

import os
import resource
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from decode.llm import LLM
from engine.config import CacheConfig, EngineConfig
from engine.kv_arena import KVArena, MappedArena, shared_memory_supported
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not shared_memory_supported(), reason="needs memfd (Linux)")
SHAPE = (6, 4, 2, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_peer_mapping_sees_the_same_bytes(dtype: torch.dtype) -> None:
    arena = KVArena(3, SHAPE, dtype)
    assert len(arena.caches) == 3
    for k, v in arena.caches:
        assert k.shape == v.shape == SHAPE and k.dtype == dtype and not k.any()
    # A peer gets the file descriptor over a socket; a dup of it is the same file.
    peer = MappedArena(os.dup(arena.fd), arena.info)
    assert peer.live
    arena.caches[2][1][5, 3] = 7.0
    assert peer.caches[2][1][5, 3].eq(7.0).all()
    peer.caches[0][0][1] = -2.0  # and the other way round
    assert arena.caches[0][0][1].eq(-2.0).all() and not arena.caches[0][1].any()
    arena.retire()
    arena.retire()  # idempotent
    assert not peer.live and arena.fd == -1


def test_peer_mapping_is_populated_so_its_writes_take_no_page_faults() -> None:
    arena = KVArena(2, (256, 16, 4, 64), torch.float32)  # 4 MiB per tensor: 4096 pages
    peer = MappedArena(os.dup(arena.fd), arena.info)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for k, v in peer.caches:
        k.fill_(1.0)
        v.fill_(2.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 400  # one per 4 KiB page (4096) when the mapping is not populated
    assert bool((arena.caches[1][1] == 2.0).all())


def test_a_file_of_another_size_is_refused() -> None:
    arena = KVArena(2, SHAPE, torch.float32)
    with pytest.raises(ValueError, match=f"file has {arena.info.nbytes} bytes, expected"):
        MappedArena(arena.fd, replace(arena.info, nbytes=arena.info.nbytes + 64))
    with pytest.raises(ValueError, match=r"layers and a shape >= 1, got 0"):
        KVArena(0, SHAPE, torch.float32)


def generate(path: Path, shared: bool) -> tuple[list[list[int]], LLM]:
    cache = CacheConfig(num_blocks=32, block_size=16, shared_memory=shared)
    llm = LLM(EngineConfig(model=str(path), dtype="float32", cache=cache))
    prompts = [list(range(5, 40)), [30, 31, 32], [7] * 20]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    return [o.token_ids for o in outs], llm


def test_engine_with_a_shared_pool_gives_the_same_tokens(tiny_llama: Path) -> None:
    shared, llm = generate(tiny_llama, True)
    arena = llm.runner.kv_arena
    assert (
        arena is not None and arena.caches[0][0].data_ptr() == llm.runner.kv_caches[0][0].data_ptr()
    )
    assert shared == generate(tiny_llama, False)[0]
    old = MappedArena(os.dup(arena.fd), arena.info)
    llm.runner.resize_kv(16)  # the old pool is retired, a new one serves
    assert not old.live and llm.runner.kv_arena is not None and llm.runner.kv_arena.fd >= 0
    llm.shutdown()


def test_shared_pool_needs_the_cpu() -> None:
    with pytest.raises(ValueError, match="cache.shared_memory needs device 'cpu', got 'cuda'"):
        EngineConfig(model="m", device="cuda", cache=CacheConfig(shared_memory=True))
