"""The KV transfer benchmark's floors, in one process (no Ray): they move the bytes
they claim to time."""

from __future__ import annotations

import threading

import pytest

from bench.kv_floors import BenchHolder


def test_floors_move_their_bytes() -> None:
    holder = BenchHolder(range(1), range(1), 4)
    nbytes = (9 << 20) + 123  # not a whole number of 4 MiB messages
    try:
        address = holder.grpc_bare_address()
        assert holder.grpc_bare_address() == address  # one server per holder
        assert holder.grpc_bare_pull(address, nbytes) > 0
        assert holder.grpc_bare_pull(address, nbytes, copies=False) > 0
        with pytest.raises(ValueError, match="at most 256 MiB"):
            holder.grpc_bare_pull(address, (256 << 20) + 1)
        port = holder.socket_open()
        sender = threading.Thread(target=holder.socket_send, args=(port, nbytes))
        sender.start()
        assert holder.socket_recv(nbytes) > 0  # returns only once all bytes arrived
        sender.join()
        assert holder.memcpy_seconds(1 << 20) > 0
        assert holder.memcpy_seconds(1 << 20, cold=True) > 0
    finally:
        holder.close_transports()
        holder._bare[0].stop(None)
