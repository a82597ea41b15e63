"""A same-host control path from the driver to a worker that skips Ray's actor call.

A Ray actor call costs 2-3 ms here (measured by ``bench/kvtransfer.py`` as the
"empty call"), more than copying a 512-token prompt's KV. For the ``local`` transport's
direct path (one call to the source worker per transfer) the driver instead rings the
source's doorbell: a length-prefixed msgpack request on an abstract unix socket, answered
by a thread of the worker, ~0.1 ms. It serves processes of the same user only
(SO_PEERCRED). A driver on another host cannot reach the socket (it is per network
namespace) and keeps using actor calls.

Wire format, each way: 4-byte little-endian length, then a msgpack value. Request: the
handler's argument (a map). Reply: ``[0, result]`` or ``[1, error type, message]``;
ValueError, TimeoutError and ConnectionError are raised as themselves at the driver,
anything else as RuntimeError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from kvtransfer.layout import Move

_LEN = struct.Struct("<I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TimeoutError": TimeoutError,
    "ConnectionError": ConnectionError,
}


def same_user(conn: socket.socket) -> bool:
    """Whether the peer of unix socket ``conn`` runs as this process's user."""
    _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return bool(uid == os.getuid())


def pack_moves(moves: Sequence[Move]) -> list[list[Any]]:
    """``moves`` as msgpack-ready lists (see :func:`unpack_moves`)."""
    return [
        [m.src_rank, m.dst_rank, m.layers.start, m.layers.stop, m.kv_heads.start,
         m.kv_heads.stop, list(m.src_blocks), list(m.dst_blocks)]
        for m in moves
    ]  # fmt: skip


def unpack_moves(rows: Sequence[Sequence[Any]]) -> list[Move]:
    """The moves :func:`pack_moves` packed (validated by ``Move`` itself)."""
    return [
        Move(int(s), int(d), range(l0, l1), range(h0, h1), tuple(sb), tuple(db))
        for s, d, l0, l1, h0, h1, sb, db in rows
    ]


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _frame(value: Any) -> bytes:
    body = msgpack.packb(value)
    return _LEN.pack(len(body)) + body


class Listener:
    """An abstract unix socket, bound on first :meth:`start`, that serves each
    connection from a process of this user with ``serve(conn)`` on a daemon thread of
    its own (the connection is closed after; an OSError there means the peer left)."""

    def __init__(self, prefix: str, serve: Callable[[socket.socket], None]):
        self._serve = serve
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.name = f"\0{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def start(self) -> str:
        """Binds and starts accepting (once); returns the socket's name."""
        with self._lock:
            if self._listener is None:
                self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listener.bind(self.name)
                self._listener.listen(16)
                threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self.name

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                if same_user(conn):
                    self._serve(conn)
            except OSError:
                return

    def close(self) -> None:
        """Stops accepting (connections being served are served to their end)."""
        with self._lock:
            if self._listener is not None:
                # close() alone leaves the socket listening while the accept thread is
                # blocked in it (the kernel holds the file): shutdown wakes it up first.
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None


class Doorbell:
    """Worker side: answers requests with ``handler(request) -> int``, one thread per
    driver connection, requests of a connection in order."""

    def __init__(self, handler: Callable[[dict[str, Any]], int]):
        self._handler = handler
        self._listener = Listener("pdkv-bell", self._serve)
        self.name = self._listener.name

    def address(self) -> str:
        """The socket's (abstract) name; starts listening on first use."""
        return self._listener.start()

    def _serve(self, conn: socket.socket) -> None:
        while (head := _recv_exact(conn, _LEN.size)) is not None:
            body = _recv_exact(conn, _LEN.unpack(head)[0])
            if body is None:
                return
            conn.sendall(_frame(self._answer(msgpack.unpackb(body))))

    def _answer(self, request: Any) -> list[Any]:
        try:
            if not isinstance(request, dict):
                raise ValueError(f"a doorbell request is a map, got {type(request).__name__}")
            return [0, self._handler(request)]
        except Exception as e:  # the driver re-raises it: a transfer error, not ours
            return [1, type(e).__name__, str(e)]

    def close(self) -> None:
        """Stops accepting drivers (connected ones are served until they leave)."""
        self._listener.close()


class DoorbellClient:
    """Driver side: one connection to a worker's :class:`Doorbell`, bound to the event
    loop that opened it; one request at a time (the caller serializes them)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, name: str) -> DoorbellClient | None:
        """Connects to the doorbell ``name``; None when it is not reachable from here
        (another host or network namespace)."""
        try:
            reader, writer = await asyncio.open_unix_connection(name)
        except OSError:
            return None
        return cls(reader, writer)

    async def call(self, request: dict[str, Any]) -> int:
        """Sends ``request`` and returns the worker's result; raises the worker's error
        (see the module docstring), ConnectionError when the worker is gone."""
        self._writer.write(_frame(request))
        try:
            await self._writer.drain()
            head = await self._reader.readexactly(_LEN.size)
            reply = msgpack.unpackb(await self._reader.readexactly(_LEN.unpack(head)[0]))
        except (asyncio.IncompleteReadError, OSError) as e:
            raise ConnectionError(f"KV doorbell: the worker closed the connection ({e})") from None
        if reply[0] == 0:
            return int(reply[1])
        err = _ERRORS.get(reply[1])
        raise err(reply[2]) if err else RuntimeError(f"{reply[1]}: {reply[2]}")

    def close(self) -> None:
        """Closes the connection (the worker's thread for it ends)."""
        if not self.loop.is_closed():
            self._writer.close()
