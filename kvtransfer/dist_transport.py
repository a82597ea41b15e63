"""The ``gloo`` and ``nccl`` transports: torch.distributed point-to-point on one 2-rank
process group per (source worker, destination worker) channel.

The groups never touch the default process group (each instance's workers use theirs
for TP/PP): the source worker hosts a ``TCPStore`` (one per worker, lazily started);
a channel is ``PrefixStore(key, store)`` plus ``ProcessGroupGloo`` / ``ProcessGroupNCCL``
of 2 ranks (source 0, destination 1), built on the channel's first transfer (both
sides at once: the rendezvous) and cached. A failed or timed-out transfer leaves a
gloo pair closed, so the driver then drops the channel and the next one uses a new key.

Per transfer: the source sends a header (dtype, block_size, head_dim, pieces); the
destination answers 0 (go) or 1 (refused: it raises a ValueError naming expected vs
got, the source a ValueError saying the destination refused). Then one send per
:class:`~kvtransfer.blocks.Piece` (in :func:`split_pieces` order), up to ``depth``
in flight, through a ring of reusable staging buffers on each side.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvtransfer.blocks import KVView, MoveIO, slab, split_pieces
from kvtransfer.layout import Move
from kvtransfer.transport import (
    KeyedChannelTransport,
    WorkerHandle,
    actor_key,
    both_ends,
)
from kvtransfer.wire import check_geometry, geometry, refused

DEFAULT_MAX_BYTES = 4 << 20
DEPTH = 4


@dataclass(frozen=True)
class DistChannel:
    """One pair group: its key, backend, the source's store and both ends' hosts."""

    key: str
    backend: str
    store_host: str
    store_port: int
    dst_host: str
    max_bytes: int = DEFAULT_MAX_BYTES


class _Group:
    """A pair group and its staging ring (``DEPTH`` slots of ``max_bytes``)."""

    def __init__(self, pg: Any, device: torch.device, max_bytes: int):
        self.pg = pg
        self.device = device
        self.ring = torch.empty((DEPTH, max_bytes), dtype=torch.uint8, device=device)

    def wait(self, work: Any, timeout_s: float) -> None:
        try:
            work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            if "imed out" in str(e) or "timeout" in str(e).lower():
                raise TimeoutError(f"pair group: {e}") from e
            raise


class DistGroups:
    """One worker's store and pair groups (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._store: Any = None
        self._groups: dict[str, _Group] = {}

    def endpoint(self, host: str, timeout_s: float = 60.0) -> tuple[str, int]:
        """This worker's TCPStore (started once on a free port of ``host``)."""
        with self._lock:
            if self._store is None:
                timeout = timedelta(seconds=timeout_s)
                self._store = dist.TCPStore(
                    host, 0, is_master=True, wait_for_workers=False, timeout=timeout
                )
            return host, int(self._store.port)

    def _group(self, ch: DistChannel, rank: int, device: torch.device, timeout_s: float) -> _Group:
        with self._lock:
            if ch.key in self._groups:
                return self._groups[ch.key]
        timeout = timedelta(seconds=timeout_s)
        if rank == 0 and self._store is None:
            raise RuntimeError("dist_endpoint() must run on the source before a transfer")
        # A client connection per channel, on both sides: a store object serializes its
        # operations, so a rendezvous waiting for a dead peer would block the others.
        base = dist.TCPStore(ch.store_host, ch.store_port, is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"pdkv/{ch.key}", base)
        if ch.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            # NCCL's watchdog aborts (by default: kills) the process past this: keep it
            # well above any transfer's timeout; transfers wait with their own timeout.
            opts._timeout = max(timeout, timedelta(minutes=10))
            pg: Any = dist.ProcessGroupNCCL(store, rank, 2, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            opts._timeout = timeout  # the rendezvous; ops wait with their own timeout
            host = ch.store_host if rank == 0 else ch.dst_host
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            pg = dist.ProcessGroupGloo(store, rank, 2, opts)
            device = torch.device("cpu")
        group = _Group(pg, device, ch.max_bytes)
        with self._lock:
            self._groups[ch.key] = group
        return group

    def _device(self, view: KVView, backend: str) -> torch.device:
        if backend == "nccl" and view.device.type != "cuda":
            raise ValueError("the nccl KV transport needs a CUDA KV cache")
        return view.device

    def send(self, view: KVView, ch: DistChannel, moves: list[Move], timeout_s: float) -> int:
        """Source side (rank 0) of one transfer; returns the bytes sent."""
        g = self._group(ch, 0, self._device(view, ch.backend), timeout_s)
        ios = [MoveIO(view, m, "src") for m in moves]
        pieces = split_pieces(moves, [view.block_bytes(m) for m in moves], ch.max_bytes)
        hdr = geometry(view, len(pieces))
        g.wait(g.pg.send([torch.tensor(hdr, device=g.device)], 1, 0), timeout_s)
        ack = torch.zeros(5, dtype=torch.int64, device=g.device)
        g.wait(g.pg.recv([ack], 1, 0), timeout_s)
        refused(hdr, [int(x) for x in ack.tolist()])
        works: deque[Any] = deque()
        for i, piece in enumerate(pieces):
            if len(works) == DEPTH:
                g.wait(works.popleft(), timeout_s)
            io = ios[piece.move]
            out = slab(g.ring[i % DEPTH], io, piece)
            if g.device == view.device:
                io.gather(piece, out)
            else:  # gloo from a CUDA cache: stage on the CPU
                out.copy_(io.gather(piece, torch.empty_like(out, device=view.device)))
            works.append(g.pg.send([g.ring[i % DEPTH, : io.nbytes(piece)]], 1, 0))
        while works:
            g.wait(works.popleft(), timeout_s)
        return sum(ios[p.move].nbytes(p) for p in pieces)

    def recv(self, view: KVView, ch: DistChannel, moves: list[Move], timeout_s: float) -> int:
        """Destination side (rank 1) of one transfer; returns the bytes written."""
        g = self._group(ch, 1, self._device(view, ch.backend), timeout_s)
        hdr = torch.zeros(4, dtype=torch.int64, device=g.device)
        g.wait(g.pg.recv([hdr], 0, 0), timeout_s)
        pieces = split_pieces(moves, [view.block_bytes(m) for m in moves], ch.max_bytes)
        want = geometry(view, len(pieces))
        status = 0
        try:
            ios = [MoveIO(view, m, "dst") for m in moves]
            check_geometry(want, [int(x) for x in hdr.tolist()])
        except ValueError:
            status = 1
            raise
        finally:  # the answer, also when refusing: the source then fails fast
            ack = torch.tensor([status, *want], device=g.device)
            g.wait(g.pg.send([ack], 0, 0), timeout_s)
        sizes = [ios[p.move].nbytes(p) for p in pieces]
        works = deque(
            g.pg.recv([g.ring[i, : sizes[i]]], 0, 0) for i in range(min(DEPTH, len(pieces)))
        )
        for i, piece in enumerate(pieces):
            g.wait(works.popleft(), timeout_s)
            io = ios[piece.move]
            io.scatter(piece, slab(g.ring[i % DEPTH], io, piece).to(view.device))
            if i + DEPTH < len(pieces):
                j = i + DEPTH
                works.append(g.pg.recv([g.ring[j % DEPTH, : sizes[j]]], 0, 0))
        if g.device.type == "cuda":
            torch.cuda.current_stream(g.device).synchronize()
        return sum(sizes)

    def drop(self, key: str) -> bool:
        """Forgets channel ``key`` (its group is freed once no transfer uses it)."""
        with self._lock:
            return self._groups.pop(key, None) is not None

    def close(self) -> None:
        """Drops every channel and stops the store."""
        with self._lock:
            self._groups.clear()
            self._store = None


class DistTransport(KeyedChannelTransport):
    """Pair groups of torch.distributed (``gloo`` on CPU tensors, ``nccl`` on CUDA)."""

    def __init__(
        self, backend: str = "gloo", host: str = "127.0.0.1", max_bytes: int = DEFAULT_MAX_BYTES
    ):
        super().__init__()
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise ValueError("the nccl KV transport needs CUDA (and NCCL); none here: use gloo")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.name = backend
        self.host = host
        self.max_bytes = max_bytes
        self._stores: dict[str, tuple[str, int]] = {}

    async def _pair(
        self,
        request_id: str,
        moves: list[Move],
        src: WorkerHandle,
        dst: WorkerHandle,
        deadline: float,
    ) -> int:
        pair = (actor_key(src), actor_key(dst))
        if pair not in self._channels:
            if pair[0] not in self._stores:
                host, port = await src.dist_endpoint.remote(self.host)
                self._stores[pair[0]] = (str(host), int(port))
            host, port = self._stores[pair[0]]
            key = uuid.uuid4().hex[:16]
            ch = DistChannel(key, self.name, host, port, self.host, self.max_bytes)
            self._channels[pair] = (ch, src, dst)
        ch = self._channels[pair][0]
        timeout = self.remaining(deadline)
        sent = src.send_blocks.remote(ch, moves, timeout)
        written = dst.recv_blocks.remote(ch, moves, timeout)
        return await both_ends(sent, written)

    def close(self) -> None:
        super().close()
        self._stores.clear()
