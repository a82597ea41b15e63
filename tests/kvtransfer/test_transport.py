"""The driver side's contract (``Transport.transfer``) for one pair and for several:
results, worker errors, timeouts, and no straggler left running after a failure is
reported. The pairs here are a minimal concrete transport whose workers take a given
time (no Ray, no bytes: the orchestration alone)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from kvtransfer.layout import KVShape, Move
from kvtransfer.transport import TransferError, TransferStats, Transport, WorkerHandle

SHAPE = KVShape(2, 1, 4, 2)
PAIR_BYTES = 2 * 2 * 2 * 4 * 4  # a pair's move: 2 layers x K, V x 2 tokens x 4 fp32


@dataclass
class _Id:
    name: str

    def hex(self) -> str:
        return self.name


@dataclass
class Worker:
    """A worker handle with a name (``actor_key``), how long its half of a pair takes,
    and what it does then: write the pair's bytes, write too few, or raise."""

    name: str
    seconds: float = 0.0
    outcome: str = "ok"  # ok | short | fail
    finished: list[float] = field(default_factory=list)

    @property
    def _actor_id(self) -> _Id:
        return _Id(self.name)


class TimedTransport(Transport):
    """Each pair takes its source worker's ``seconds``, then does its ``outcome``."""

    name = "timed"
    grace_s = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.dropped: list[tuple[str, str]] = []

    async def _pair(
        self, request_id: str, moves: list[Move], src: WorkerHandle, dst: WorkerHandle,
        deadline: float,
    ) -> int:  # fmt: skip
        await asyncio.sleep(src.seconds)
        src.finished.append(time.perf_counter())
        if src.outcome == "fail":
            raise ValueError(f"worker {src.name} refused")
        written = sum(m.num_bytes(SHAPE) for m in moves)
        return written - 1 if src.outcome == "short" else written

    def _drop_pair(self, pair: tuple[str, str], src: WorkerHandle, dst: WorkerHandle) -> None:
        self.dropped.append(pair)


def moves(pairs: int) -> list[Move]:
    return [Move(r, r, range(2), range(1), (r,), (r,)) for r in range(pairs)]


def transfer(t: Transport, srcs: list[Worker], timeout_s: float) -> tuple[float, object]:
    """Runs one transfer over ``len(srcs)`` pairs; (seconds, stats or the exception)."""
    dsts = [Worker(f"d{i}") for i in range(len(srcs))]

    async def run() -> object:
        try:
            return await t.transfer("r", moves(len(srcs)), SHAPE, srcs, dsts, timeout_s)
        except Exception as e:
            return e

    start = time.perf_counter()
    out = asyncio.run(run())
    return time.perf_counter() - start, out


@pytest.mark.parametrize("pairs", [1, 3])
def test_a_transfer_in_time_returns_its_bytes(pairs: int) -> None:
    _, stats = transfer(TimedTransport(), [Worker(f"s{i}", 0.01) for i in range(pairs)], 5.0)
    assert isinstance(stats, TransferStats)
    assert stats.num_bytes == pairs * PAIR_BYTES


@pytest.mark.parametrize("pairs", [1, 3])
def test_a_worker_error_is_a_transfer_error_naming_it(pairs: int) -> None:
    t = TimedTransport()
    srcs = [Worker(f"s{i}", 0.01, "fail" if i == 0 else "ok") for i in range(pairs)]
    _, err = transfer(t, srcs, 5.0)
    assert isinstance(err, TransferError)
    assert "(ValueError: worker s0 refused)" in str(err)
    assert ("s0", "d0") in t.dropped  # the failed pair's channel is dropped


@pytest.mark.parametrize("pairs", [1, 3])
def test_bytes_other_than_the_plan_are_a_transfer_error(pairs: int) -> None:
    srcs = [Worker(f"s{i}", 0.0, "short" if i == pairs - 1 else "ok") for i in range(pairs)]
    _, err = transfer(TimedTransport(), srcs, 5.0)
    assert isinstance(err, TransferError)
    want = pairs * PAIR_BYTES
    assert f"destinations wrote {want - 1} bytes, the plan has {want}" in str(err)


@pytest.mark.parametrize("pairs", [1, 3])
def test_a_late_worker_is_a_timeout_reported_after_it_stopped(pairs: int) -> None:
    # finishes after the deadline, within the grace: the transfer is a timeout, and
    # it is reported only once the worker stopped (no straggler writes after it)
    srcs = [Worker(f"s{i}", 0.2 if i == 0 else 0.0) for i in range(pairs)]
    _, err = transfer(TimedTransport(), srcs, 0.05)
    assert isinstance(err, TimeoutError)
    assert "did not finish within 0.05s" in str(err)
    assert srcs[0].finished  # else asyncio.run would have cancelled it unfinished


@pytest.mark.parametrize("pairs", [1, 3])
def test_a_hung_worker_is_given_up_on_after_the_grace(pairs: int) -> None:
    t = TimedTransport()
    srcs = [Worker(f"s{i}", 30.0 if i == 0 else 0.0) for i in range(pairs)]
    seconds, err = transfer(t, srcs, 0.05)
    assert isinstance(err, TimeoutError)
    assert 0.05 + t.grace_s - 0.01 <= seconds < 5.0
    assert not srcs[0].finished  # cancelled, never finished
    assert ("s0", "d0") in t.dropped
