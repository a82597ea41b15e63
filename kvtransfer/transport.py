"""The driver side of KV transports: one interface, chosen by name (``make_transport``).

A transport moves the bytes of a transfer plan (a list of :class:`Move`) from the
source instance's worker actors to the destination's, rank to rank. It runs in the
controller's asyncio event loop and only sends actor calls: the bytes go worker to
worker (gRPC stream, torch.distributed pair group, shared memory), never through here.

Moves are grouped per (src_rank, dst_rank) pair: one call per side per pair, all pairs
at once. Transfers over the same pair of workers run one after the other (an asyncio
lock per pair), so both ends of a pair channel always see transfers in the same order.
A transfer that fails or times out drops the channels it used (the workers are told to
drop theirs), so the next transfer starts on fresh ones.
"""

from __future__ import annotations

import asyncio
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from kvtransfer.layout import KVShape, Move

# A Ray ActorHandle of a class that inherits kvtransfer.worker.KVTransferMixin.
WorkerHandle = Any
TRANSPORTS = ("gloo", "nccl", "grpc", "local")


class TransferError(RuntimeError):
    """A transfer failed (a worker raised, died, or the data did not match)."""


@dataclass(frozen=True)
class TransferStats:
    """Bytes a transfer moved and the wall seconds it took (driver side)."""

    num_bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        """Effective throughput in GB/s (10^9 bytes per second)."""
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def actor_key(worker: WorkerHandle) -> str:
    """A stable id of an actor handle (its Ray actor id)."""
    return str(worker._actor_id.hex())


def group_moves(moves: Sequence[Move]) -> dict[tuple[int, int], list[Move]]:
    """Moves per (src_rank, dst_rank), in plan order."""
    pairs: dict[tuple[int, int], list[Move]] = {}
    for move in moves:
        pairs.setdefault((move.src_rank, move.dst_rank), []).append(move)
    return pairs


def check_plan(
    moves: Sequence[Move], shape: KVShape, num_src: int, num_dst: int, timeout_s: float
) -> None:
    """ValueError naming the first move or argument that does not fit."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    for move in moves:
        if not 0 <= move.src_rank < num_src:
            raise ValueError(f"{move}: src_rank outside the {num_src} source workers")
        if not 0 <= move.dst_rank < num_dst:
            raise ValueError(f"{move}: dst_rank outside the {num_dst} destination workers")
        if move.layers.start < 0 or move.layers.stop > shape.num_layers:
            raise ValueError(f"{move}: layers outside the model's {shape.num_layers}")
        if move.kv_heads.start < 0 or move.kv_heads.stop > shape.num_kv_heads:
            raise ValueError(f"{move}: kv heads outside the model's {shape.num_kv_heads}")


class Transport(ABC):
    """Moves a plan's KV from source to destination workers (indexed by rank)."""

    name: str = ""
    # After a failure, how long to wait for the other workers to stop by themselves.
    grace_s: float = 2.0

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def transfer(
        self,
        request_id: str,
        moves: Sequence[Move],
        shape: KVShape,
        src_workers: Sequence[WorkerHandle],
        dst_workers: Sequence[WorkerHandle],
        timeout_s: float,
    ) -> TransferStats:
        """Moves ``moves``; TimeoutError after ``timeout_s``, TransferError when a worker
        fails or writes other than the plan's bytes, ValueError for a bad plan."""
        check_plan(moves, shape, len(src_workers), len(dst_workers), timeout_s)
        if not moves:
            return TransferStats(0, 0.0)
        pairs = group_moves(moves)
        expected = sum(m.num_bytes(shape) for m in moves)
        what = f"{self.name} transfer {request_id!r} ({expected} bytes, {len(pairs)} pairs)"
        start = time.perf_counter()
        deadline = start + timeout_s
        calls = [
            self._locked_pair(request_id, pm, src_workers[s], dst_workers[d], deadline)
            for (s, d), pm in pairs.items()
        ]
        if len(calls) == 1:  # the common case: awaited in this task, no task hops
            written = await self._one(calls[0], what, timeout_s, deadline)
        else:
            written = await self._all(calls, what, timeout_s)
        if written != expected:
            raise TransferError(
                f"{self.name} transfer {request_id!r}: destinations wrote {written} bytes, "
                f"the plan has {expected} (KVShape disagrees with the workers' caches)"
            )
        return TransferStats(expected, time.perf_counter() - start)

    async def connect(self, src: WorkerHandle, dst: WorkerHandle, timeout_s: float) -> None:
        """Opens the channel between workers ``src`` and ``dst`` ahead of their first
        transfer (an empty transfer: the gRPC connection, the pair group, the mapping of
        a shared pool and the doorbell), which otherwise pays for it: ~0.2 s here for
        the local transport's default pool. Raises as :meth:`transfer` does."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        deadline = time.perf_counter() + timeout_s
        call = self._locked_pair("connect", [], src, dst, deadline)
        await self._one(
            call,
            f"{self.name} connect of {actor_key(src)} -> {actor_key(dst)}",
            timeout_s,
            deadline,
        )

    async def _one(
        self, call: Coroutine[Any, Any, int], what: str, timeout_s: float, deadline: float
    ) -> int:
        """Awaits one pair's ``call``: as :meth:`_all` does, a result past the deadline
        is a timeout, and a worker still running then is given ``grace_s`` to stop by
        itself (it has the same deadline) before it is given up on."""
        try:
            if sys.version_info >= (3, 11):
                async with asyncio.timeout(timeout_s + self.grace_s):
                    written = await call
            else:
                try:
                    written = await asyncio.wait_for(call, timeout_s + self.grace_s)
                except asyncio.TimeoutError:
                    raise TimeoutError() from None
        except Exception as e:
            raise _failure(what, timeout_s, [e]) from e
        if time.perf_counter() > deadline:
            raise _failure(what, timeout_s, [])
        return written

    async def _all(self, calls: list[Coroutine[Any, Any, int]], what: str, timeout_s: float) -> int:
        """Runs the pairs' ``calls`` at once; their total written bytes. On a failure or
        timeout, waits (a little) for the other pairs to stop, then raises."""
        tasks = [asyncio.ensure_future(c) for c in calls]
        try:
            done, pending = await asyncio.wait(
                tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION
            )
        except asyncio.CancelledError:  # our caller gave up: so do the pairs
            await _settle(tasks, 0.0)
            raise
        errors = [e for t in done if (e := t.exception()) is not None]
        if pending or errors:
            # Workers stop by themselves at the deadline: wait for them (a little) so
            # that no straggler writes into blocks after we report the failure.
            await _settle(tasks, self.grace_s)
            raise _failure(what, timeout_s, errors) from (errors[0] if errors else None)
        return sum(t.result() for t in tasks)

    async def _locked_pair(
        self,
        request_id: str,
        moves: list[Move],
        src: WorkerHandle,
        dst: WorkerHandle,
        deadline: float,
    ) -> int:
        pair = (actor_key(src), actor_key(dst))
        lock = self._locks.setdefault(pair, asyncio.Lock())
        async with lock:
            try:
                return await self._pair(request_id, moves, src, dst, deadline)
            except BaseException:  # cancelled (timed out) included: drop the channel
                self._drop_pair(pair, src, dst)
                raise

    @staticmethod
    def remaining(deadline: float) -> float:
        """Seconds left before ``deadline`` (worker calls get it as their own timeout)."""
        return max(0.001, deadline - time.perf_counter())

    @abstractmethod
    async def _pair(
        self,
        request_id: str,
        moves: list[Move],
        src: WorkerHandle,
        dst: WorkerHandle,
        deadline: float,
    ) -> int:
        """Moves one rank pair's ``moves``; returns the bytes the destination wrote."""

    @abstractmethod
    def _drop_pair(self, pair: tuple[str, str], src: WorkerHandle, dst: WorkerHandle) -> None:
        """After a failure on ``pair``: forget its channel (the next transfer opens a
        new one) and tell both workers to drop theirs."""

    def close(self) -> None:
        """Forgets every channel and tells the workers to drop theirs (without waiting)."""
        self._locks.clear()


async def both_ends(src_ref: Any, dst_ref: Any, wait_s: float = 1.0) -> int:
    """Awaits the source and destination calls of one pair; returns the destination's
    result. When the source fails first, waits up to ``wait_s`` for the destination,
    whose error says more (what it expected); a dead peer still fails fast."""
    src, dst = asyncio.ensure_future(src_ref), asyncio.ensure_future(dst_ref)
    for f in (src, dst):  # an error left behind is retrieved, not logged at exit
        f.add_done_callback(lambda f: f.cancelled() or f.exception())
    await asyncio.wait([src, dst], return_when=asyncio.FIRST_EXCEPTION)
    if not dst.done():
        await asyncio.wait([dst], timeout=wait_s)
    if dst.done() and (err := dst.exception()) is not None:
        raise err
    if dst.done():
        await src  # raises the source's error, if any
        return int(dst.result())
    dst.cancel()
    await src  # failed (else dst would be done): raises its error
    raise RuntimeError("unreachable")


def _failure(what: str, timeout_s: float, errors: Sequence[BaseException]) -> Exception:
    """The error a failed transfer raises: TimeoutError when it ran out of time (or a
    worker did), else TransferError naming the first worker error."""
    if not errors or any(isinstance(e, TimeoutError) for e in errors):
        cause = next((_cause(e) for e in errors), "")
        return TimeoutError(f"{what} did not finish within {timeout_s:.3g}s {cause}")
    return TransferError(f"{what} failed: {_cause(errors[0])}")


async def _settle(tasks: Sequence[asyncio.Future[int]], grace_s: float) -> None:
    """Waits up to ``grace_s`` for ``tasks``, then cancels the rest (they drop their
    channels) and waits for them to unwind."""
    pending = [t for t in tasks if not t.done()]
    if pending and grace_s > 0:
        _, still = await asyncio.wait(pending, timeout=grace_s)
        pending = list(still)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class KeyedChannelTransport(Transport):
    """A transport whose rank pairs talk over a channel both workers know by ``key``
    (a pair group, a shared-memory ring): ``_channels`` maps a pair to (channel, src,
    dst); dropping a pair tells both workers to drop that key."""

    def __init__(self) -> None:
        super().__init__()
        self._channels: dict[tuple[str, str], tuple[Any, WorkerHandle, WorkerHandle]] = {}

    def _drop_pair(self, pair: tuple[str, str], src: WorkerHandle, dst: WorkerHandle) -> None:
        entry = self._channels.pop(pair, None)
        if entry is not None:
            src.drop_channel.remote(entry[0].key)
            dst.drop_channel.remote(entry[0].key)

    def close(self) -> None:
        super().close()
        for pair, (_, src, dst) in list(self._channels.items()):
            self._drop_pair(pair, src, dst)


def _cause(e: BaseException) -> str:
    """A worker's error without Ray's wrapping (RayTaskError keeps it as ``cause``)."""
    cause = getattr(e, "cause", None)
    err = cause if isinstance(cause, BaseException) else e
    text = str(err).strip()
    return f"({type(err).__name__}: {text})" if text else f"({type(err).__name__})"


def make_transport(name: str, **options: Any) -> Transport:
    """The transport called ``name`` (gloo, nccl, grpc, local) with its options."""
    if name == "grpc":
        from kvtransfer.grpc_transport import GrpcTransport

        return GrpcTransport(**options)
    if name in ("gloo", "nccl"):
        from kvtransfer.dist_transport import DistTransport

        return DistTransport(name, **options)
    if name == "local":
        from kvtransfer.local_transport import LocalTransport

        return LocalTransport(**options)
    raise ValueError(f"unknown KV transport {name!r}; choose one of {TRANSPORTS}")
