"""The ``grpc`` transport: the destination worker pulls from the source worker's gRPC
KV server over one server-streaming call per rank pair. Works across hosts.

Wire format (no protobuf; raw bytes through a generic handler):

* method ``/pdserve.kvtransfer.KVTransfer/Pull``, unary request, streamed responses;
* request: msgpack map ``{"request_id": str, "dtype": str, "max_bytes": int,
  "moves": [[layer_start, layer_stop, head_start, head_stop, [src_block, ...]], ...]}``
  (``dtype``: what the destination's cache holds; the server refuses another with
  INVALID_ARGUMENT before sending anything);
* each response is one :class:`~kvtransfer.blocks.Piece` (K or V of one layer over a
  run of at most ``max_bytes`` of a move's blocks, in :func:`split_pieces` order):
  a 4-byte little-endian header length ``n``, ``n`` bytes of msgpack header
  ``[move, layer, part, block_start, block_stop, dtype]``, then the piece's raw bytes
  (C order ``[blocks, block_size, heads, head_dim]``).

The receiver checks every header against the piece it expects next and the payload's
size and dtype against its own cache (ValueError naming expected vs got), and scatters
each piece straight from the received bytes into its blocks.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import msgpack
import torch

from kvtransfer.blocks import KVView, MoveIO, Piece, dtype_name, slab, split_pieces
from kvtransfer.layout import Move
from kvtransfer.transport import Transport, WorkerHandle, actor_key
from kvtransfer.wire import from_bytes

METHOD = "/pdserve.kvtransfer.KVTransfer/Pull"
DEFAULT_MAX_BYTES = 4 << 20
# Unlimited messages, 16 MiB HTTP/2 frames, large TCP reads: each cut the CPU per byte
# (measured here with bench/kvtransfer.py, the client being the bottleneck).
OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20),
]
_LEN = struct.Struct("<I")


def _identity(b: bytes) -> bytes:
    return b


def encode_request(request_id: str, dtype: str, max_bytes: int, moves: Sequence[Move]) -> bytes:
    """The Pull request for ``moves`` (see the module docstring)."""
    spec = [
        [m.layers.start, m.layers.stop, m.kv_heads.start, m.kv_heads.stop, list(m.src_blocks)]
        for m in moves
    ]
    body = {"request_id": request_id, "dtype": dtype, "max_bytes": max_bytes, "moves": spec}
    return bytes(msgpack.packb(body))


def decode_request(data: bytes) -> tuple[str, str, int, list[Move]]:
    """(request_id, dtype, max_bytes, moves) of a Pull request; moves carry the source
    blocks on both sides (the server only reads)."""
    body = msgpack.unpackb(data)
    moves = [
        Move(0, 0, range(l0, l1), range(h0, h1), tuple(blocks), tuple(blocks))
        for l0, l1, h0, h1, blocks in body["moves"]
    ]
    return str(body["request_id"]), str(body["dtype"]), int(body["max_bytes"]), moves


def _chunk_header(piece: Piece, dtype: str) -> bytes:
    layers = piece.layers
    head = msgpack.packb([piece.move, layers.start, layers.stop, piece.start, piece.stop, dtype])
    return _LEN.pack(len(head)) + head


def _read_header(msg: bytes) -> tuple[Piece, str, int]:
    """(piece, dtype, payload offset) of one response message."""
    (n,) = _LEN.unpack_from(msg)
    move, lo, hi, start, stop, dtype = msgpack.unpackb(msg[_LEN.size : _LEN.size + n])
    return Piece(move, range(lo, hi), start, stop), str(dtype), _LEN.size + n


class KVServer:
    """This worker's gRPC KV server: streams pieces of its cache to pullers."""

    def __init__(self, view: Callable[[], KVView], host: str, max_workers: int = 4):
        self._view = view
        pool = ThreadPoolExecutor(max_workers, thread_name_prefix="kv-grpc")
        self._server = grpc.server(pool, options=OPTIONS)
        service, method = METHOD.rsplit("/", 1)
        handler = grpc.unary_stream_rpc_method_handler(
            self._pull, request_deserializer=_identity, response_serializer=_identity
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.strip("/"), {method: handler}),)
        )
        bind = f"[{host}]" if ":" in host else host
        port = self._server.add_insecure_port(f"{bind}:0")
        if port == 0:
            raise OSError(f"could not bind a gRPC KV server on {host}")
        self._server.start()
        self.address = f"{bind}:{port}"

    def _plan(self, request: bytes) -> tuple[list[MoveIO], list[Piece]]:
        _, dtype, max_bytes, moves = decode_request(request)
        view = self._view()
        if dtype != dtype_name(view.dtype):
            raise ValueError(
                f"dtype mismatch: destination expects {dtype}, source holds "
                f"{dtype_name(view.dtype)}"
            )
        ios = [MoveIO(view, m, "src") for m in moves]
        return ios, split_pieces(moves, [view.block_bytes(m) for m in moves], max_bytes)

    def _pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Pull handler: streams the requested pieces (INVALID_ARGUMENT if this worker
        does not hold them or holds another dtype)."""
        try:
            ios, pieces = self._plan(request)
        except (ValueError, KeyError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        dtype = dtype_name(ios[0].view.dtype) if ios else ""
        buf: torch.Tensor | None = None  # staging, only for rows that are not contiguous
        for piece in pieces:
            io = ios[piece.move]
            rows = io.rows(piece)
            if rows is None:
                if buf is None:
                    buf = torch.empty(max(ios[p.move].nbytes(p) for p in pieces), dtype=torch.uint8)
                io.gather(piece, slab(buf, io, piece))
                rows = [buf[: io.nbytes(piece)].numpy().data]
            # One copy from the cache (or the staging buffer) into the message.
            yield b"".join([_chunk_header(piece, dtype), *rows])

    def stop(self) -> None:
        """Stops serving (in-flight streams are cancelled)."""
        self._server.stop(None)


def pull(
    channel: grpc.Channel,
    request_id: str,
    moves: Sequence[Move],
    view: KVView,
    timeout_s: float,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Pulls ``moves`` over ``channel`` into ``view``; returns the bytes written.
    TimeoutError past ``timeout_s``; ValueError on a refused or malformed stream."""
    ios = [MoveIO(view, m, "dst") for m in moves]  # checks them before any byte moves
    expected = split_pieces(moves, [view.block_bytes(m) for m in moves], max_bytes)
    dtype = dtype_name(view.dtype)
    call = channel.unary_stream(
        METHOD, request_serializer=_identity, response_deserializer=_identity
    )
    stream = call(encode_request(request_id, dtype, max_bytes, moves), timeout=timeout_s)
    written = 0
    try:
        for i, msg in enumerate(stream):
            piece, got_dtype, offset = _read_header(msg)
            if i >= len(expected) or piece != expected[i]:
                want = expected[i] if i < len(expected) else "end of stream"
                raise ValueError(f"piece {i}: expected {want}, got {piece}")
            if got_dtype != dtype:
                raise ValueError(f"piece {i}: expected dtype {dtype}, got {got_dtype}")
            io = ios[piece.move]
            io.scatter(piece, from_bytes(msg, view.dtype, io.shape(piece), offset))
            written += io.nbytes(piece)
    except grpc.RpcError as e:
        raise _rpc_error(e) from None
    finally:
        stream.cancel()
    if written != sum(io.nbytes(io.whole()) for io in ios):
        raise ValueError(f"stream ended early: {written} bytes in {len(expected)} pieces")
    return written


def _rpc_error(e: grpc.RpcError) -> Exception:
    code, details = e.code(), e.details()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(f"gRPC KV pull: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    return ConnectionError(f"gRPC KV pull: {code.name}: {details}")


class Channels:
    """Client channels of one worker, one per server address (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(address, options=OPTIONS)
            return self._channels[address]

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


class GrpcTransport(Transport):
    """Destination workers pull from source workers' gRPC KV servers."""

    name = "grpc"

    def __init__(self, host: str = "127.0.0.1", max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__()
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.host = host
        self.max_bytes = max_bytes
        self._addresses: dict[str, str] = {}

    async def _pair(
        self,
        request_id: str,
        moves: list[Move],
        src: WorkerHandle,
        dst: WorkerHandle,
        deadline: float,
    ) -> int:
        key = actor_key(src)
        if key not in self._addresses:
            self._addresses[key] = await src.kv_server_address.remote(self.host)
        ref = dst.pull_blocks.remote(
            self._addresses[key], request_id, moves, self.remaining(deadline), self.max_bytes
        )
        return int(await ref)

    def _drop_pair(self, pair: tuple[str, str], src: WorkerHandle, dst: WorkerHandle) -> None:
        self._addresses.pop(pair[0], None)  # asked again next time (the server may be new)

    def close(self) -> None:
        super().close()
        self._addresses.clear()
