"""Every KV transport between real Ray actors: bytes land exactly, errors are precise,
timeouts and dead peers raise and leave the next transfer working."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvtransfer.arena_copy import ArenaEndpoint
from kvtransfer.layout import KVShape, Move
from kvtransfer.testing import KVHolder
from kvtransfer.transport import TransferError, Transport, make_transport
from kvtransfer.worker import remote_class

LAYERS, HEADS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 4, 2, 32, 16, 64
# name, options: small pieces so that every ring/stream wraps around many times
TRANSPORTS: list[Any] = [
    pytest.param(("grpc", {"max_bytes": 8192}), id="grpc"),
    pytest.param(("gloo", {"max_bytes": 8192}), id="gloo"),
    pytest.param(("local", {}), id="local-direct"),  # into the shared destination pools
    pytest.param(("local", {"slots": 2, "slot_bytes": 8192, "direct": False}), id="local-ring"),
    pytest.param(("local", {"via": "object_store"}), id="local-object-store"),
    pytest.param(("nccl", {}), id="nccl", marks=pytest.mark.gpu),
]


def holder(shared: bool = False) -> Any:
    actor = remote_class(KVHolder).options(num_cpus=0.25)
    return actor.remote(range(LAYERS), range(1), BLOCKS, BLOCK_SIZE, HEAD_DIM, shared=shared)


@pytest.fixture(scope="module")
def workers(ray_cluster: None) -> Iterator[dict[str, Any]]:
    """One source rank (heads 0-1 of layers 0-3, TP1), two destination ranks (one head
    each, TP2; KV in shared memory, as decode workers under the local transport), a
    destination whose KV is private, and one that is gone (killed before it started)."""
    import ray

    src, dsts, private = holder(), [holder(True), holder(True)], holder()
    dead = holder()
    ray.kill(dead)
    live = (src, *dsts, private)
    ray.get([a.pid.remote() for a in live], timeout=120)
    yield {"src": src, "dsts": dsts, "private": private, "dead": dead}
    ray.get([a.close_transports.remote() for a in live], timeout=30)
    for a in live:
        ray.kill(a)


def use(workers: dict[str, Any], dtype: str, dst_dtype: str | None = None) -> Any:
    """Fresh random caches of ``dtype`` (destinations: ``dst_dtype``); (sources, dests)."""
    import ray

    src, dsts = workers["src"], workers["dsts"]
    geometry = (BLOCKS, BLOCK_SIZE, HEAD_DIM)
    refs = [src.reset.remote(range(LAYERS), range(2), *geometry, dtype, 1)]
    for h, d in enumerate(dsts):
        refs.append(
            d.reset.remote(range(LAYERS), range(h, h + 1), *geometry, dst_dtype or dtype, 2 + h)
        )
    ray.get(refs, timeout=30)
    return [src], dsts


def plan(src_blocks: tuple[int, ...], dst_blocks: tuple[int, ...]) -> list[Move]:
    """TP1 -> TP2: each destination rank gets its head of every layer; two moves for
    rank 1 (layers split) so that one pair carries several moves."""
    return [
        Move(0, 0, range(LAYERS), range(0, 1), src_blocks, dst_blocks),
        Move(0, 1, range(0, 1), range(1, 2), src_blocks, dst_blocks),
        Move(0, 1, range(1, LAYERS), range(1, 2), src_blocks, dst_blocks),
    ]


def shape(dtype: str) -> KVShape:
    return KVShape(LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, dtype)


# One event loop for the module, as in the controller: what a transfer set up (gRPC
# addresses, local doorbells) serves the next transfers of the same transport.
LOOP = asyncio.new_event_loop()


@pytest.fixture(scope="module", autouse=True)
def _close_loop() -> Iterator[None]:
    yield

    async def cancel_left() -> None:  # as asyncio.run does: cancel what is left, then close
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)  # (made in LOOP, even if empty)

    LOOP.run_until_complete(cancel_left())
    LOOP.close()


def run(transport: Transport, moves: list[Move], pair: Any, dtype: str, timeout: float) -> Any:
    src, dst = pair
    return LOOP.run_until_complete(
        transport.transfer("req", moves, shape(dtype), src, dst, timeout)
    )


def caches(actor: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import ray

    return list(ray.get(actor.get_caches.remote(), timeout=30))


def check_landed(pair: Any, moves: list[Move], before: list[Any]) -> None:
    """Destination blocks equal the source's exactly; every other block is untouched."""
    (src,), dsts = pair
    src_kv = caches(src)
    for rank, dst in enumerate(dsts):
        after = caches(dst)
        written = {(layer, b) for m in moves if m.dst_rank == rank for layer in m.layers
                   for b in m.dst_blocks}  # fmt: skip
        for layer in range(LAYERS):
            for part in (0, 1):
                for b in range(BLOCKS):
                    got = after[layer][part][b, :, 0]
                    if (layer, b) in written:
                        m = next(m for m in moves if m.dst_rank == rank and layer in m.layers)
                        s = m.src_blocks[m.dst_blocks.index(b)]
                        assert torch.equal(got, src_kv[layer][part][s, :, rank])
                    else:
                        assert torch.equal(got, before[rank][layer][part][b, :, 0])


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    name, options = request.param
    t = make_transport(name, **options)
    yield t
    t.close()


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transfer_lands_exactly(transport: Transport, dtype: str, workers: dict[str, Any]) -> None:
    pair = use(workers, dtype)
    moves = plan((3, 0, 17, 9, 30), (5, 6, 7, 20, 1))
    before = [caches(d) for d in pair[1]]
    stats = run(transport, moves, pair, dtype, 30.0)
    assert stats.num_bytes == sum(m.num_bytes(shape(dtype)) for m in moves)
    assert stats.seconds > 0 and stats.gbps > 0
    check_landed(pair, moves, before)
    moves = plan(tuple(range(BLOCKS)), tuple(reversed(range(BLOCKS))))  # again, all blocks
    run(transport, moves, pair, dtype, 30.0)
    check_landed(pair, moves, [caches(d) for d in pair[1]])


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_dtype_mismatch_raises_then_recovers(transport: Transport, workers: dict[str, Any]) -> None:
    mixed = use(workers, "float32", "bfloat16")
    with pytest.raises(TransferError, match=r"(?s)float32.*bfloat16|bfloat16.*float32"):
        run(transport, plan((1,), (2,)), mixed, "float32", 20.0)
    pair = use(workers, "float32")
    moves = plan((4, 5), (8, 9))
    before = [caches(d) for d in pair[1]]
    run(transport, moves, pair, "float32", 20.0)
    check_landed(pair, moves, before)


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_blocks_the_destination_lacks_fail_fast(
    transport: Transport, workers: dict[str, Any]
) -> None:
    pair = use(workers, "float32")
    start = time.perf_counter()
    with pytest.raises(
        TransferError, match=f"block {BLOCKS + 3} is outside this cache of {BLOCKS}"
    ):
        run(transport, plan((1,), (BLOCKS + 3,)), pair, "float32", 20.0)
    assert time.perf_counter() - start < 10.0  # not a timeout


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_timeout_then_next_transfer_works(transport: Transport, workers: dict[str, Any]) -> None:
    pair = use(workers, "float32")
    moves = plan(tuple(range(BLOCKS)), tuple(range(BLOCKS)))
    with pytest.raises(TimeoutError, match="did not finish within"):
        run(transport, moves, pair, "float32", 0.002)
    moves = plan((0, 1), (10, 11))
    before = [caches(d) for d in pair[1]]
    run(transport, moves, pair, "float32", 30.0)
    check_landed(pair, moves, before)


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_dead_destination_raises_then_others_work(
    transport: Transport, workers: dict[str, Any]
) -> None:
    pair = use(workers, "float32")
    with pytest.raises(TransferError, match="died|dead|ActorDied"):
        run(transport, plan((0,), (1,))[:1], (pair[0], [workers["dead"]]), "float32", 5.0)
    moves = plan((2, 3), (12, 13))
    before = [caches(d) for d in pair[1]]
    run(transport, moves, pair, "float32", 30.0)
    check_landed(pair, moves, before)


def test_wrong_kv_shape_is_caught(workers: dict[str, Any]) -> None:
    """A KVShape that disagrees with the caches (head_dim) fails, naming both sizes."""
    src, dst = use(workers, "float32")
    t = make_transport("grpc")
    bad = KVShape(LAYERS, HEADS, HEAD_DIM * 2, BLOCK_SIZE, "float32")
    with pytest.raises(TransferError, match="destinations wrote .* bytes, the plan has"):
        asyncio.run(t.transfer("req", plan((0,), (1,)), bad, src, dst, 20.0))
    t.close()


def test_plan_and_names_are_checked(workers: dict[str, Any]) -> None:
    src, dst = [workers["src"]], workers["dsts"]
    t = make_transport("grpc")
    bad = [Move(0, 2, range(1), range(1), (0,), (0,))]
    with pytest.raises(ValueError, match="dst_rank outside the 2 destination workers"):
        asyncio.run(t.transfer("req", bad, shape("float32"), src, dst, 5.0))
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        asyncio.run(t.transfer("req", plan((0,), (0,)), shape("float32"), src, dst, 0))
    with pytest.raises(ValueError, match=r"unknown KV transport 'tcp'"):
        make_transport("tcp")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl KV transport needs CUDA"):
            make_transport("nccl")


def test_local_falls_back_to_the_ring_for_a_private_pool(workers: dict[str, Any]) -> None:
    """A destination whose KV is not in shared memory exports nothing: the same
    transport goes through a ring, with the same bytes landing."""
    import ray

    (src,), _ = use(workers, "float32")
    private = workers["private"]
    ray.get(private.reset.remote(range(LAYERS), range(1), BLOCKS, BLOCK_SIZE, HEAD_DIM), timeout=30)
    assert ray.get(private.local_export.remote(), timeout=30) is None
    t = make_transport("local")
    moves = [Move(0, 0, range(LAYERS), range(0, 1), (3, 4, 30), (0, 9, 2))]
    before = caches(private)
    run(t, moves, ([src], [private]), "float32", 30.0)
    assert not isinstance(next(iter(t._channels.values()))[0], ArenaEndpoint)
    t.close()
    src_kv, after = caches(src), caches(private)
    for layer in range(LAYERS):
        for part in (0, 1):
            assert torch.equal(
                after[layer][part][[0, 9, 2], :, 0], src_kv[layer][part][[3, 4, 30], :, 0]
            )
            assert torch.equal(after[layer][part][5], before[layer][part][5])


def test_local_direct_fails_on_a_reallocated_pool_then_recovers(workers: dict[str, Any]) -> None:
    """The destination reallocates its pool after the source mapped it: the next transfer
    fails (the old pool is retired) instead of writing where nobody reads; the one after
    maps the new pool and lands."""
    t = make_transport("local")
    pair = use(workers, "float32")
    run(t, plan((1, 2), (3, 4)), pair, "float32", 30.0)
    assert all(isinstance(ep, ArenaEndpoint) for ep, _, _ in t._channels.values())
    pair = use(workers, "float32")  # new pools; the transport still holds the old endpoints
    with pytest.raises(TransferError, match="retired|stale"):
        run(t, plan((1, 2), (3, 4)), pair, "float32", 30.0)
    moves = plan((5, 6), (7, 8))
    before = [caches(d) for d in pair[1]]
    run(t, moves, pair, "float32", 30.0)
    check_landed(pair, moves, before)
    t.close()


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_connect_opens_the_channel_then_transfers_land(
    transport: Transport, workers: dict[str, Any]
) -> None:
    """``connect`` (an empty transfer) opens each pair's channel; the first real
    transfer after it lands exactly (the local transport's already on the doorbell)."""
    pair = use(workers, "float32")
    (src,), dsts = pair
    for dst in dsts:
        LOOP.run_until_complete(transport.connect(src, dst, 30.0))
    if getattr(transport, "direct", False) and getattr(transport, "via", "") == "shm":
        bells = transport._bells  # type: ignore[attr-defined]
        assert len(bells) == 2 and all(b is not None for b in bells.values())
    moves = plan((6, 7), (9, 8))
    before = [caches(d) for d in dsts]
    run(transport, moves, pair, "float32", 30.0)
    check_landed(pair, moves, before)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        LOOP.run_until_complete(transport.connect(src, dsts[0], 0))


def test_local_direct_rings_the_doorbell_after_the_first_transfer(
    workers: dict[str, Any],
) -> None:
    """The first transfer of a pair maps the pool through an actor call and connects to
    the source's doorbell; the next ones go through the doorbell and land the same
    bytes; a transfer from another event loop goes through the actor call again."""
    t = make_transport("local")
    pair = use(workers, "float32")
    for i, (src_blocks, dst_blocks) in enumerate([((1, 2), (3, 4)), ((5, 6, 7), (8, 9, 10))]):
        moves = plan(src_blocks, dst_blocks)
        before = [caches(d) for d in pair[1]]
        run(t, moves, pair, "float32", 30.0)
        check_landed(pair, moves, before)
        bells = list(t._bells.values())  # type: ignore[attr-defined]
        assert len(bells) == 2 and all(b is not None for b in bells), i
    moves = plan((11,), (12,))
    before = [caches(d) for d in pair[1]]
    asyncio.run(t.transfer("req", moves, shape("float32"), pair[0], pair[1], 30.0))
    check_landed(pair, moves, before)
    t.close()
    assert not t._bells  # type: ignore[attr-defined]


def test_local_direct_without_a_reachable_doorbell_stays_on_actor_calls(
    workers: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver that cannot reach the source's doorbell (another host) asks once per
    pair, then every transfer goes through the actor call and lands the same bytes."""
    from kvtransfer import local_transport

    asked: list[str] = []

    async def unreachable(name: str) -> None:
        asked.append(name)

    monkeypatch.setattr(local_transport.DoorbellClient, "connect", unreachable)
    t = make_transport("local")
    pair = use(workers, "float32")
    for src_blocks, dst_blocks in [((1,), (2,)), ((3, 4), (5, 6)), ((7,), (8,))]:
        moves = plan(src_blocks, dst_blocks)
        before = [caches(d) for d in pair[1]]
        run(t, moves, pair, "float32", 30.0)
        check_landed(pair, moves, before)
    assert len(asked) == 2  # one per (source, destination) pair
    t.close()
