"""Worker-side KV transfer: the Ray actor methods a worker gains by inheriting
:class:`KVTransferMixin` (``engine.worker.Worker`` does; tests use a small holder).

The driver (``kvtransfer.transport``) calls them; the bytes go worker to worker. Every
method that waits on a peer takes ``timeout_s`` and raises ``TimeoutError`` past it.
They run in the actor's ``"kv"`` concurrency group: create the actor with
:func:`remote_class` (``ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(cls)``; Ray
refuses the KV methods of an actor made without it).
Then transfers, channel drops and ``execute`` never queue behind each other, while the
default group (``execute``, ``free``...) stays one thread, in call order. The caller
keeps ``execute`` off the blocks of a transfer in flight (source: until it is acked;
destination: until it is done).
The first transfer call tunes this process's glibc malloc (:func:`tune_malloc`).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np

from kvtransfer.arena_copy import ArenaEndpoint, ArenaExports, ArenaWriters
from kvtransfer.blocks import KVView, dtype_name, gather, scatter
from kvtransfer.dist_transport import DistChannel, DistGroups
from kvtransfer.doorbell import Doorbell, unpack_moves
from kvtransfer.grpc_transport import DEFAULT_MAX_BYTES, Channels, KVServer, pull
from kvtransfer.layout import Move
from kvtransfer.local_transport import LocalChannels, LocalEndpoint
from kvtransfer.wire import as_bytes, from_bytes

KV_GROUP = "kv"
# Threads for KV methods: concurrent pulls/sends of several pairs, plus drops.
CONCURRENCY_GROUPS = {KV_GROUP: 4}
_INIT_LOCK = threading.Lock()
_F = TypeVar("_F", bound=Callable[..., Any])


def remote_class(cls: type) -> Any:
    """``ray.remote(cls)`` with the KV concurrency group declared (use ``.options``
    for resources): how a class inheriting :class:`KVTransferMixin` becomes an actor."""
    import ray

    remote: Any = ray.remote
    return remote(concurrency_groups=CONCURRENCY_GROUPS)(cls)


def kv_method(f: _F) -> _F:
    """Marks ``f`` to run in the actor's ``"kv"`` concurrency group. Without Ray
    installed ``f`` is returned as is: a single-process engine (no actors) needs no
    group, and the engine must import without Ray."""
    try:
        import ray
    except ImportError:
        return f
    return cast(_F, ray.method(concurrency_group=KV_GROUP)(f))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass(frozen=True)
class KVPayload:
    """One gathered move through Ray's object store: dtype name, shape and raw bytes
    (numpy, so that the destination reads it from the object store without a copy)."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray


def tune_malloc() -> None:
    """Keeps glibc from handing multi-MiB buffers back to the OS on every free: each
    gRPC message (and staging buffer) would otherwise be page-faulted and zeroed anew,
    ~30% of a receiving worker's CPU (measured). Allocations under 32 MiB come from the
    heap, and up to 256 MiB of free heap is kept. No-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


class _State:
    """Transport state of one worker, made on first use."""

    def __init__(self, view: Callable[[], KVView]) -> None:
        tune_malloc()
        self._view = view
        self.lock = threading.Lock()
        self.server: KVServer | None = None
        self.channels = Channels()
        self.dist = DistGroups()
        self.local = LocalChannels()
        self.exports = ArenaExports(view)
        self.writers = ArenaWriters()
        self.doorbell = Doorbell(self._ring)

    def _ring(self, request: dict[str, Any]) -> int:
        """A doorbell request: ``{"key", "moves", "timeout_s"}``, a ``local_write`` into
        a pool that an earlier ``local_write`` mapped."""
        moves = unpack_moves(request["moves"])
        key, timeout_s = str(request["key"]), float(request["timeout_s"])
        return self.writers.write_mapped(self._view(), key, moves, timeout_s)


def resolve_host(host: str) -> str:
    """``host``, or for ``"auto"`` this node's IP as Ray sees it (for multi-host)."""
    if host != "auto":
        return host
    import ray

    return str(ray.util.get_node_ip_address())


class KVTransferMixin:
    """KV transfer actor methods (see kvtransfer.transport for who calls what)."""

    def kv_view(self) -> KVView:
        """This worker's KV cache with its global layers and KV heads."""
        raise NotImplementedError("a KV transfer worker must implement kv_view()")

    def _kv_state(self) -> _State:
        with _INIT_LOCK:
            state: _State | None = self.__dict__.get("_kv_transfer_state")
            if state is None:
                state = self.__dict__["_kv_transfer_state"] = _State(self.kv_view)
            return state

    # -- Ray object store ------------------------------------------------------------
    @kv_method
    def export_blocks(self, moves: list[Move]) -> list[KVPayload]:
        """Gathers each move (its layers, heads and ``src_blocks``) for the object store."""
        view = self.kv_view()
        out = []
        for move in moves:
            t = gather(view, move).cpu()
            out.append(KVPayload(dtype_name(t.dtype), tuple(t.shape), as_bytes(t)))
        return out

    @kv_method
    def import_blocks(self, moves: list[Move], payloads: list[KVPayload]) -> int:
        """Writes ``export_blocks``' payloads into each move's ``dst_blocks``; returns the
        bytes written. ValueError naming expected vs got on a count, dtype or size
        mismatch."""
        if len(payloads) != len(moves):
            raise ValueError(f"expected {len(moves)} payloads, got {len(payloads)}")
        view = self.kv_view()
        written = 0
        for move, p in zip(moves, payloads, strict=True):
            if p.dtype != dtype_name(view.dtype):
                raise ValueError(
                    f"dtype mismatch: expected {dtype_name(view.dtype)}, got {p.dtype}"
                )
            tensor = from_bytes(p.data, view.dtype, p.shape)
            scatter(view, move, tensor.to(view.device))
            written += tensor.nbytes
        return written

    # -- gRPC --------------------------------------------------------------------------
    @kv_method
    def kv_server_address(self, host: str = "127.0.0.1") -> str:
        """``host:port`` of this worker's gRPC KV server, started on the first call on a
        free port of ``host`` (``"auto"``: this node's IP). Later calls return it."""
        state = self._kv_state()
        with state.lock:
            if state.server is None:
                state.server = KVServer(self.kv_view, resolve_host(host))
            return state.server.address

    @kv_method
    def pull_blocks(
        self,
        address: str,
        request_id: str,
        moves: list[Move],
        timeout_s: float,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> int:
        """Pulls ``moves`` from the KV server at ``address`` (streamed in pieces of at
        most ``max_bytes``) into their ``dst_blocks``; returns the bytes written.
        TimeoutError past ``timeout_s``, ValueError if the server refuses (dtype, blocks)
        or the stream does not match, ConnectionError if the server is unreachable."""
        channel = self._kv_state().channels.get(address)
        return pull(channel, request_id, moves, self.kv_view(), timeout_s, max_bytes)

    # -- torch.distributed (gloo / nccl) ---------------------------------------------
    @kv_method
    def dist_endpoint(self, host: str = "127.0.0.1") -> tuple[str, int]:
        """(host, port) of this worker's TCPStore for pair groups, started on the first
        call on ``host`` (``"auto"``: this node's IP)."""
        return self._kv_state().dist.endpoint(resolve_host(host))

    @kv_method
    def send_blocks(self, channel: DistChannel, moves: list[Move], timeout_s: float) -> int:
        """Source end (rank 0) of one transfer on pair group ``channel`` (made on its
        first use, with the destination's ``recv_blocks`` running at the same time);
        returns the bytes sent. TimeoutError past ``timeout_s``."""
        return self._kv_state().dist.send(self.kv_view(), _resolved(channel), moves, timeout_s)

    @kv_method
    def recv_blocks(self, channel: DistChannel, moves: list[Move], timeout_s: float) -> int:
        """Destination end (rank 1) of ``send_blocks``; returns the bytes written.
        ValueError naming expected vs got if the source's dtype or geometry differ."""
        return self._kv_state().dist.recv(self.kv_view(), _resolved(channel), moves, timeout_s)

    # -- shared memory (same host) -----------------------------------------------------
    @kv_method
    def local_open(self, key: str, slots: int, slot_bytes: int) -> LocalEndpoint:
        """Source: makes shared-memory channel ``key`` (``slots`` x ``slot_bytes`` ring)
        for one destination worker; returns where that worker connects."""
        return self._kv_state().local.open(key, slots, slot_bytes)

    @kv_method
    def local_send(self, key: str, moves: list[Move], timeout_s: float) -> int:
        """Source end of one transfer on channel ``key`` (the destination's
        ``local_recv`` runs at the same time); returns the bytes sent."""
        return self._kv_state().local.send(self.kv_view(), key, moves, timeout_s)

    @kv_method
    def local_recv(self, endpoint: LocalEndpoint, moves: list[Move], timeout_s: float) -> int:
        """Destination end of ``local_send`` (connects on the channel's first transfer);
        returns the bytes written. ValueError naming expected vs got on a mismatch."""
        return self._kv_state().local.recv(self.kv_view(), endpoint, moves, timeout_s)

    @kv_method
    def local_export(self) -> ArenaEndpoint | None:
        """Destination: where same-host sources map this worker's KV pool to write into
        it directly (``local_write``), or None when the pool is not in shared memory."""
        return self._kv_state().exports.export()

    @kv_method
    def local_write(self, endpoint: ArenaEndpoint, moves: list[Move], timeout_s: float) -> int:
        """Source: copies ``moves`` straight into the destination pool at ``endpoint``
        (mapped on first use); the destination takes no part. Returns the bytes written;
        ValueError naming both sides on a geometry mismatch, ConnectionError when that
        pool was reallocated, TimeoutError past ``timeout_s``."""
        return self._kv_state().writers.write(self.kv_view(), endpoint, moves, timeout_s)

    @kv_method
    def local_doorbell(self) -> str:
        """Source: the abstract unix socket where a same-host driver asks for further
        ``local_write`` s into pools already mapped here, without an actor call
        (``kvtransfer.doorbell``)."""
        return self._kv_state().doorbell.address()

    # -- lifecycle ---------------------------------------------------------------------
    @kv_method
    def drop_channel(self, key: str) -> bool:
        """Drops pair channel ``key`` (dist group, shared ring or mapped pool) after a failed
        transfer; the driver opens a new one. Returns whether it existed here."""
        state = self._kv_state()
        return state.dist.drop(key) | state.local.drop(key) | state.writers.drop(key)

    @kv_method
    def close_transports(self) -> None:
        """Stops the gRPC server and drops every channel and client of this worker."""
        state = self._kv_state()
        with state.lock:
            if state.server is not None:
                state.server.stop()
                state.server = None
        state.channels.close()
        state.dist.close()
        state.local.close()
        state.exports.close()
        state.writers.close()
        state.doorbell.close()


def _resolved(ch: DistChannel) -> DistChannel:
    if ch.dst_host != "auto":
        return ch
    from dataclasses import replace

    return replace(ch, dst_host=resolve_host("auto"))
