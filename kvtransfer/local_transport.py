"""The ``local`` transport (same host). Where the destination's KV pool is in shared
memory the source writes into it directly (``kvtransfer.arena_copy``): the first
transfer of a pair is an actor call that maps the pool, later ones ring the source's
doorbell (``kvtransfer.doorbell``, no actor call). Otherwise the pieces go through a
shared-memory ring, described here.

Per (source worker, destination worker) channel the source makes a ring of ``slots``
x ``slot_bytes`` in an anonymous shared file (``memfd``) and listens on an abstract
unix socket; on the channel's first transfer the destination connects and gets the
file descriptor over the socket (SCM_RIGHTS). Nothing has a name in the file system:
the ring is freed when both ends drop the channel or exit. The ring is reused by
later transfers on the channel: fresh shared pages cost ~10x a warm copy here
(page faults), so a per-transfer segment would cap the transport far below memcpy.

Per transfer, over the socket (fixed 9 x int64 little-endian messages): source
``START`` (seq, dtype, block_size, head_dim, pieces) → destination ``ACK`` (seq, 0 ok
or 1 refused, its own header; both ends then raise a ValueError naming expected vs
got); then for each :class:`~kvtransfer.blocks.Piece` the source gathers into a free
slot and sends ``PIECE`` (seq, slot, move, layer_start, layer_stop, block_start,
block_stop); the destination scatters from the slot and answers ``FREE`` (seq, slot).
Gather and scatter run in parallel in the two processes. The socket's syscalls order
the shared-memory writes before the reads.

``via="object_store"`` instead passes numpy arrays through Ray's object store
(``export_blocks`` → ``import_blocks``; works across hosts, slower).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from kvtransfer.arena_copy import ArenaEndpoint
from kvtransfer.blocks import KVView, MoveIO, Piece, slab, split_pieces
from kvtransfer.doorbell import DoorbellClient, pack_moves
from kvtransfer.layout import Move
from kvtransfer.transport import (
    KeyedChannelTransport,
    WorkerHandle,
    actor_key,
    both_ends,
)
from kvtransfer.wire import check_geometry, geometry, refused

START, ACK, PIECE, FREE = 1, 2, 3, 4
_MSG = struct.Struct("<9q")


@dataclass(frozen=True)
class LocalEndpoint:
    """Where the destination finds a channel: the source's abstract socket name."""

    key: str
    socket_name: str
    slots: int
    slot_bytes: int


class _Channel:
    """One end of a channel: its socket, the shared ring and the transfer counter."""

    def __init__(self, conn: socket.socket, ring: torch.Tensor, slots: int):
        self.conn = conn
        self.ring = ring.view(slots, -1)
        self.seq = 0

    def send(self, *fields: int) -> None:
        self.conn.sendall(_MSG.pack(*fields, *([0] * (9 - len(fields)))))

    def recv(self, kind: int) -> tuple[int, ...]:
        buf = bytearray(_MSG.size)
        view, got = memoryview(buf), 0
        while got < _MSG.size:
            n = self.conn.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("local KV channel closed by the peer")
            got += n
        msg = _MSG.unpack(buf)
        if msg[0] != kind or msg[1] != self.seq:
            raise ValueError(f"expected message {kind} of transfer {self.seq}, got {msg[:2]}")
        return msg

    def close(self) -> None:
        self.conn.close()


def _map_fd(fd: int, nbytes: int) -> torch.Tensor:
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)


class LocalChannels:
    """One worker's local channels, source and destination ends (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[socket.socket, int, LocalEndpoint]] = {}
        self._channels: dict[str, _Channel] = {}

    def open(self, key: str, slots: int, slot_bytes: int) -> LocalEndpoint:
        """Source: makes channel ``key``'s ring and listening socket."""
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"slots and slot_bytes must be >= 1, got {slots}, {slot_bytes}")
        name = f"\0pdkv-{os.getpid()}-{key}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(name)
        listener.listen(1)
        fd = os.memfd_create(f"pdkv-{key}")
        os.ftruncate(fd, slots * slot_bytes)
        endpoint = LocalEndpoint(key, name, slots, slot_bytes)
        with self._lock:
            self._pending[key] = (listener, fd, endpoint)
        return endpoint

    def _source(self, key: str, timeout_s: float) -> _Channel:
        with self._lock:
            if key in self._channels:
                return self._channels[key]
            if key not in self._pending:
                raise ValueError(f"no local KV channel {key!r} here: open it first")
            listener, fd, ep = self._pending.pop(key)
        try:
            listener.settimeout(timeout_s)
            conn, _ = listener.accept()
            socket.send_fds(conn, [b"R"], [fd])
            ring = _map_fd(fd, ep.slots * ep.slot_bytes)
        finally:
            listener.close()
            os.close(fd)
        ring.zero_()  # fault the pages in once, not during transfers
        ch = _Channel(conn, ring, ep.slots)
        with self._lock:
            self._channels[key] = ch
        return ch

    def _destination(self, ep: LocalEndpoint, timeout_s: float) -> _Channel:
        with self._lock:
            if ep.key in self._channels:
                return self._channels[ep.key]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout_s)
        conn.connect(ep.socket_name)
        _, fds, _, _ = socket.recv_fds(conn, 1, 1)
        if len(fds) != 1:
            conn.close()
            raise ConnectionError(f"local KV channel {ep.key}: no shared memory received")
        try:
            ring = _map_fd(fds[0], ep.slots * ep.slot_bytes)
        finally:
            os.close(fds[0])
        ch = _Channel(conn, ring, ep.slots)
        with self._lock:
            self._channels[ep.key] = ch
        return ch

    def send(self, view: KVView, key: str, moves: list[Move], timeout_s: float) -> int:
        """Source side of one transfer; returns the bytes sent."""
        ch = self._source(key, timeout_s)
        ch.conn.settimeout(timeout_s)
        ios = [MoveIO(view, m, "src") for m in moves]
        slots, slot_bytes = ch.ring.shape
        pieces = split_pieces(moves, [view.block_bytes(m) for m in moves], slot_bytes)
        header = geometry(view, len(pieces))
        ch.send(START, ch.seq, *header)
        ack = list(ch.recv(ACK)[2:7])
        if ack[0] != 0:
            ch.seq += 1
            refused(header, ack)
        free, sent = deque(range(slots)), 0
        for piece in pieces:
            if not free:
                free.append(ch.recv(FREE)[2])
            slot, io = free.popleft(), ios[piece.move]
            io.gather(piece, slab(ch.ring[slot], io, piece))
            sent += io.nbytes(piece)
            lo, hi = piece.layers.start, piece.layers.stop
            ch.send(PIECE, ch.seq, slot, piece.move, lo, hi, piece.start, piece.stop)
        while len(free) < slots:
            free.append(ch.recv(FREE)[2])
        ch.seq += 1
        return sent

    def recv(self, view: KVView, ep: LocalEndpoint, moves: list[Move], timeout_s: float) -> int:
        """Destination side of one transfer; returns the bytes written."""
        ch = self._destination(ep, timeout_s)
        ch.conn.settimeout(timeout_s)
        pieces = split_pieces(moves, [view.block_bytes(m) for m in moves], ch.ring.shape[1])
        got = list(ch.recv(START)[2:6])
        want = geometry(view, len(pieces))
        try:
            ios = [MoveIO(view, m, "dst") for m in moves]
            check_geometry(want, got)
        except ValueError:
            ch.send(ACK, ch.seq, 1, *want)
            ch.seq += 1
            raise
        ch.send(ACK, ch.seq, 0, *want)
        written = 0
        for piece in pieces:
            msg = ch.recv(PIECE)
            slot, got_piece = msg[2], Piece(msg[3], range(msg[4], msg[5]), msg[6], msg[7])
            if got_piece != piece:
                raise ValueError(f"expected {piece}, got {got_piece}")
            io = ios[piece.move]
            io.scatter(piece, slab(ch.ring[slot], io, piece))
            written += io.nbytes(piece)
            ch.send(FREE, ch.seq, slot)
        ch.seq += 1
        return written

    def drop(self, key: str) -> bool:
        """Closes channel ``key`` (either end; a pending one too)."""
        with self._lock:
            ch = self._channels.pop(key, None)
            pending = self._pending.pop(key, None)
        if ch is not None:
            ch.close()
        if pending is not None:
            pending[0].close()
            os.close(pending[1])
        return ch is not None or pending is not None

    def close(self) -> None:
        """Closes every channel."""
        with self._lock:
            keys = [*self._channels, *self._pending]
        for key in keys:
            self.drop(key)


class LocalTransport(KeyedChannelTransport):
    """Same-host transfers through shared memory (or Ray's object store): straight
    into the destination's pool when it is shared and ``direct`` (one copy,
    ``kvtransfer.arena_copy``), else through a ring (two copies, in parallel)."""

    name = "local"

    def __init__(
        self, slots: int = 4, slot_bytes: int = 4 << 20, via: str = "shm", direct: bool = True
    ):
        super().__init__()
        if via not in ("shm", "object_store"):
            raise ValueError(f"via must be 'shm' or 'object_store', got {via!r}")
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"slots and slot_bytes must be >= 1, got {slots}, {slot_bytes}")
        self.slots, self.slot_bytes, self.via = slots, slot_bytes, via
        self.direct = direct
        self._bells: dict[tuple[str, str], DoorbellClient | None] = {}

    async def _pair(
        self,
        request_id: str,
        moves: list[Move],
        src: WorkerHandle,
        dst: WorkerHandle,
        deadline: float,
    ) -> int:
        if self.via == "object_store":
            ref = dst.import_blocks.remote(moves, src.export_blocks.remote(moves))
            try:
                return int(await ref)
            except asyncio.CancelledError:
                import ray

                ray.cancel(ref)  # not started yet (waiting for the export): never writes
                raise
        pair = (actor_key(src), actor_key(dst))
        if pair not in self._channels:
            ep = await dst.local_export.remote() if self.direct else None
            if ep is None:  # the destination's pool is not shared: through a ring
                key = uuid.uuid4().hex[:16]
                ep = await src.local_open.remote(key, self.slots, self.slot_bytes)
            self._channels[pair] = (ep, src, dst)
        ep = self._channels[pair][0]
        timeout = self.remaining(deadline)
        if isinstance(ep, ArenaEndpoint):
            return await self._write(pair, ep, moves, src, timeout)
        sent = src.local_send.remote(ep.key, moves, timeout)
        written = dst.local_recv.remote(ep, moves, timeout)
        return await both_ends(sent, written)

    async def _write(
        self, pair: tuple[str, str], ep: ArenaEndpoint, moves: list[Move], src: WorkerHandle,
        timeout_s: float,
    ) -> int:  # fmt: skip
        """The direct path: the first transfer of a pair maps the pool with an actor
        call; later ones ring the source's doorbell (when reachable from here)."""
        bell, loop = self._bells.get(pair), asyncio.get_running_loop()
        if bell is not None and bell.loop is loop:
            request = {"key": ep.key, "moves": pack_moves(moves), "timeout_s": timeout_s}
            return await bell.call(request)
        written = int(await src.local_write.remote(ep, moves, timeout_s))
        if pair not in self._bells or bell is not None:  # not tried yet, or another loop's
            if bell is not None:
                bell.close()
            # None (unreachable from here) is kept: this pair stays on actor calls.
            self._bells[pair] = await DoorbellClient.connect(await src.local_doorbell.remote())
        return written

    def _drop_pair(self, pair: tuple[str, str], src: WorkerHandle, dst: WorkerHandle) -> None:
        bell = self._bells.pop(pair, None)
        if bell is not None:
            bell.close()
        super()._drop_pair(pair, src, dst)

    def close(self) -> None:
        for bell in self._bells.values():
            if bell is not None:
                bell.close()
        self._bells.clear()
        super().close()
