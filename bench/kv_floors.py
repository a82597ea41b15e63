"""The raw floors ``bench/kvtransfer.py`` holds each KV transport against, measured
between the same two Ray actors as the transfers (timed inside the workers: pure data
path, no actor call): a plain TCP stream of the same bytes on loopback, a plain memcpy
(warm, and from cold caches), and the gRPC library alone streaming the same bytes (the
ceiling of any gRPC transport on this machine), with and without the copies a KV
transport has to make."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from kvtransfer.grpc_transport import DEFAULT_MAX_BYTES
from kvtransfer.testing import KVHolder

CHUNK = DEFAULT_MAX_BYTES  # bytes per socket write / gRPC message, as the KV transport's
BARE_MAX = 256 << 20  # what the bare gRPC server can stream
EVICT = 64 << 20  # bytes written to evict the caches (twice this machine's 32 MB L3)


class BenchHolder(KVHolder):
    """KV holder that also measures the raw floors of its process pair."""

    def socket_open(self) -> int:
        """Listens on a loopback port for ``socket_send``; returns the port."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        return int(self._listener.getsockname()[1])

    def socket_send(self, port: int, nbytes: int) -> None:
        """Streams ``nbytes`` (a warm buffer) to ``port`` in 4 MiB writes."""
        data = torch.ones(nbytes, dtype=torch.uint8).numpy().data
        with socket.create_connection(("127.0.0.1", port)) as s:
            for off in range(0, nbytes, CHUNK):
                s.sendall(data[off : off + CHUNK])

    def socket_recv(self, nbytes: int) -> float:
        """Receives ``socket_send``'s stream into a warm buffer; seconds from the
        connection to the last byte."""
        buf = torch.zeros(nbytes, dtype=torch.uint8).numpy().data
        conn, _ = self._listener.accept()
        start, got = time.perf_counter(), 0
        with conn:
            while got < nbytes:
                got += conn.recv_into(buf[got:], min(CHUNK, nbytes - got))
        self._listener.close()
        return time.perf_counter() - start

    def grpc_bare_address(self) -> str:
        """Starts (once) a gRPC server that streams ``nbytes`` in 4 MiB messages, with
        the KV server's options but no cache to read; returns its address. A request
        ``"nbytes,1"`` copies each message out of a warm buffer (as a KV server gathers
        blocks into it); ``"nbytes,0"`` sends messages built beforehand (no copy)."""
        if getattr(self, "_bare", None) is None:
            import grpc

            from kvtransfer.grpc_transport import OPTIONS

            data = torch.ones(BARE_MAX, dtype=torch.uint8).numpy().data
            built = bytes(data[:CHUNK])

            def stream(request: bytes, context: Any) -> Any:
                n, copies = (int(x) for x in request.split(b","))
                for off in range(0, n, CHUNK):
                    end = min(n, off + CHUNK)
                    yield bytes(data[off:end]) if copies or end - off < CHUNK else built

            server = grpc.server(ThreadPoolExecutor(2), options=OPTIONS)
            handler = grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=bytes, response_serializer=bytes
            )
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("bench.Bare", {"Pull": handler}),)
            )
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            self._bare = (server, f"127.0.0.1:{port}")
        return str(self._bare[1])

    def grpc_bare_pull(self, address: str, nbytes: int, copies: bool = True) -> float:
        """Pulls ``nbytes`` from ``grpc_bare_address``'s server; seconds of the call (the
        gRPC library alone: no plan, gather or scatter). With ``copies`` each message is
        copied out of the server's buffer and into a warm buffer here (as a KV transport
        gathers and scatters); without, messages are built beforehand and dropped here."""
        import grpc

        from kvtransfer.grpc_transport import OPTIONS

        if nbytes > BARE_MAX:
            raise ValueError(f"the bare gRPC floor streams at most 256 MiB, got {nbytes}")
        if getattr(self, "_bare_channel", None) is None:
            self._bare_channel = grpc.insecure_channel(address, options=OPTIONS)
        call = self._bare_channel.unary_stream(
            "/bench.Bare/Pull", request_serializer=bytes, response_deserializer=bytes
        )
        buf = torch.zeros(nbytes, dtype=torch.uint8).numpy()
        start, got = time.perf_counter(), 0
        for msg in call(f"{nbytes},{int(copies)}".encode()):
            if copies:
                view = np.frombuffer(msg, dtype=np.uint8)
                buf[got : got + view.size] = view
            got += len(msg)
        seconds = time.perf_counter() - start
        if got != nbytes:
            raise ValueError(f"bare gRPC stream: expected {nbytes} bytes, got {got}")
        return seconds

    def memcpy_seconds(self, nbytes: int, cold: bool = False) -> float:
        """Seconds of one copy of ``nbytes`` between two warm buffers (best of 3); with
        ``cold``, each copy first has the caches evicted (64 MiB written elsewhere), as
        a transfer's source blocks are when they were written a while ago."""
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.zeros(nbytes, dtype=torch.uint8)
        evict = torch.zeros(EVICT if cold else 0, dtype=torch.uint8)
        best = float("inf")
        for _ in range(3):
            evict.add_(1)
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
        return best
