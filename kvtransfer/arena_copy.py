"""The ``local`` transport's one-copy path: the source worker writes a transfer's
blocks straight into the destination's KV pool, which lives in shared memory
(``engine.kv_arena``; ``CacheConfig.shared_memory``).

Destination (:class:`ArenaExports`): a daemon thread serves the current pool's file
descriptor on an abstract unix socket, to processes of the same user only
(SO_PEERCRED). :meth:`ArenaExports.export` returns the :class:`ArenaEndpoint` the
driver hands to sources. Source (:class:`ArenaWriters`): maps a destination's pool
once (the mapping is cached by arena id) and copies each move from its own cache
into the mapped one (a gather and a scatter per layer and part, in one process: half
the memory traffic of the ring's two copies, with no messages per piece). The pool's
header says whether it is still live (checked before and after writing): a pool the
destination reallocated fails the transfer rather than losing it silently.

A destination whose cache is not shared (a CUDA cache, ``shared_memory`` off) exports
nothing and the driver falls back to the shared ring (``local_transport``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kv_arena import ArenaInfo, MappedArena
from kvtransfer.blocks import KVView, MoveIO, check_dst_blocks, dtype_name
from kvtransfer.doorbell import Listener
from kvtransfer.layout import Move
from kvtransfer.rows import RowCopy, copy_runs, rows_match


@dataclass(frozen=True)
class ArenaEndpoint:
    """Where a source finds a destination's shared KV pool: the socket that hands out
    its file, the pool's geometry and the global layers / KV heads it holds. ``key`` (the
    arena id) names the channel for ``drop_channel``."""

    key: str
    socket_name: str
    info: ArenaInfo
    layers: range
    kv_heads: range


class ArenaExports:
    """Destination side: serves this worker's current shared KV pool to local peers."""

    def __init__(self, view: Callable[[], KVView]):
        self._view = view
        self._listener = Listener("pdkv-arena", self._answer)

    def export(self) -> ArenaEndpoint | None:
        """The endpoint of the current pool, or None when the cache is not shared."""
        view = self._view()
        if view.arena is None:
            return None
        name = self._listener.start()
        info = view.arena.info
        return ArenaEndpoint(info.arena_id, name, info, view.layers, view.kv_heads)

    def _answer(self, conn: socket.socket) -> None:
        arena = self._view().arena
        if arena is None or arena.fd < 0:
            return  # the peer reads EOF: refused
        socket.send_fds(conn, [arena.info.arena_id.encode()], [arena.fd])

    def close(self) -> None:
        """Stops serving (peers keep the pools they already mapped)."""
        self._listener.close()


class ArenaWriters:
    """Source side: destination pools mapped here (by arena id), and the writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mapped: dict[str, _Mapped] = {}

    def _map(self, ep: ArenaEndpoint, timeout_s: float) -> _Mapped:
        with self._lock:
            if ep.key in self._mapped:
                return self._mapped[ep.key]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout_s)
            conn.connect(ep.socket_name)
            msg, fds, _, _ = socket.recv_fds(conn, 64, 1)
        if len(fds) != 1:
            raise ConnectionError(f"KV arena {ep.key}: the destination refused to share it")
        try:
            if msg.decode() != ep.key:
                raise ValueError(
                    f"stale KV arena {ep.key}: the destination's pool is now {msg.decode()}"
                )
            mapped = MappedArena(fds[0], ep.info)
        finally:
            os.close(fds[0])
        entry = _Mapped(mapped, KVView(mapped.caches, ep.layers, ep.kv_heads))
        with self._lock:  # unmap pools their owners retired since
            self._mapped = {k: e for k, e in self._mapped.items() if e.arena.live}
            self._mapped[ep.key] = entry
        return entry

    def write(self, view: KVView, ep: ArenaEndpoint, moves: list[Move], timeout_s: float) -> int:
        """Copies ``moves`` from ``view`` into the destination's pool (mapping it on first
        use); returns the bytes written. ValueError naming both sides on a dtype or
        geometry mismatch, ConnectionError when the destination retired the pool,
        TimeoutError past ``timeout_s``."""
        deadline = time.perf_counter() + timeout_s
        return self._write(view, self._map(ep, timeout_s), moves, deadline)

    def write_mapped(self, view: KVView, key: str, moves: list[Move], timeout_s: float) -> int:
        """:meth:`write` into arena ``key``, which an earlier :meth:`write` mapped;
        ConnectionError when it is not mapped (any more)."""
        deadline = time.perf_counter() + timeout_s
        with self._lock:
            entry = self._mapped.get(key)
        if entry is None:
            raise ConnectionError(f"KV arena {key} is not mapped here: write with its endpoint")
        return self._write(view, entry, moves, deadline)

    def _write(self, view: KVView, entry: _Mapped, moves: list[Move], deadline: float) -> int:
        check_same_geometry(view, entry.view)
        self._check_live(entry.arena)
        written = sum(entry.copy(view, m, deadline) for m in moves)
        self._check_live(entry.arena)
        return written

    def _check_live(self, mapped: MappedArena) -> None:
        if not mapped.live:
            self.drop(mapped.info.arena_id)
            raise ConnectionError(f"KV arena {mapped.info.arena_id} was retired by its owner")

    def drop(self, key: str) -> bool:
        """Unmaps arena ``key`` (when no transfer still uses it). Returns whether it was mapped."""
        with self._lock:
            return self._mapped.pop(key, None) is not None

    def close(self) -> None:
        """Unmaps every arena."""
        with self._lock:
            self._mapped.clear()


class _Mapped:
    """A mapped destination pool, its view, and the row copies into it checked so far
    (per source cache, layers and KV heads: a transfer then only computes its runs)."""

    def __init__(self, arena: MappedArena, view: KVView):
        self.arena, self.view = arena, view
        self._copies: dict[tuple[int, range, range], RowCopy | None] = {}

    def copy(self, src: KVView, move: Move, deadline: float) -> int:
        """Copies ``move`` from ``src`` into this pool; returns the bytes copied."""
        key = (src.caches[0][0].data_ptr(), move.layers, move.kv_heads)
        staged: tuple[MoveIO, MoveIO] | None = None
        if key not in self._copies:
            # another source pool than before: the old one's copies would keep it alive
            self._copies = {k: c for k, c in self._copies.items() if k[0] == key[0]}
            staged = MoveIO(src, move, "src"), MoveIO(self.view, move, "dst")
            parts = zip(staged[0].parts, staged[1].parts, strict=True)
            pairs = [pair for sp, dp in parts for pair in zip(sp, dp, strict=True)]
            whole = all(rows_match(a, b) for a, b in pairs)
            self._copies[key] = RowCopy(pairs) if whole else None
        rows = self._copies[key]
        if rows is None:  # parts that are not whole blocks: staged per layer
            staged = staged or (MoveIO(src, move, "src"), MoveIO(self.view, move, "dst"))
            return copy_move(*staged, deadline)
        check_dst_blocks(move)
        if time.perf_counter() > deadline:
            raise TimeoutError(f"KV copy passed its deadline ({len(move.src_blocks)} blocks)")
        rows.run(move.src_blocks, move.dst_blocks)
        return 2 * len(move.layers) * len(move.src_blocks) * src.block_bytes(move)


def check_same_geometry(src: KVView, dst: KVView) -> None:
    """ValueError naming both sides when their dtype, block size or head dim differ."""
    a = (dtype_name(src.dtype), src.block_size, src.head_dim)
    b = (dtype_name(dst.dtype), dst.block_size, dst.head_dim)
    if a != b:
        raise ValueError(
            f"KV geometry mismatch (dtype, block_size, head_dim): source {a}, destination {b}"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A cache part as one row per block when its blocks are contiguous (all the
    layer's heads): torch's index kernels copy 2-D rows ~1.5x faster than 4-D blocks."""
    return t.view(t.shape[0], -1) if t.is_contiguous() else t


def copy_move(src: MoveIO, dst: MoveIO, deadline: float) -> int:
    """Copies one move's blocks from ``src``'s cache into ``dst``'s: block rows by
    memmove where both parts hold whole blocks contiguously (all such parts of the move
    in one call), else one layer and part at a time through a staging buffer of one
    part's blocks (a gather and a scatter: torch has no indexed copy between two
    indexed tensors); returns the bytes copied. TimeoutError when ``deadline``
    (perf_counter) passes between layers."""
    n, first = len(src.index), _rows(src.parts[0][0])
    stage: torch.Tensor | None = None
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for (sk, sv), (dk, dv) in zip(src.parts, dst.parts, strict=True):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"KV copy passed its deadline ({n} blocks per layer)")
        for s, d in ((sk, dk), (sv, dv)):
            if rows_match(s, d):
                rows.append((s, d))
                continue
            if stage is None:
                stage = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
            s, d = _rows(s), _rows(d)
            torch.index_select(s, 0, src.index, out=stage.view(n, *s.shape[1:]))
            d.index_copy_(0, dst.index, stage.view(n, *d.shape[1:]))
    copy_runs(rows, src.blocks, dst.blocks)
    return src.nbytes(src.whole())
