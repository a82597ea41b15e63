"""The local doorbell: requests reach the worker's handler and results and errors come
back as themselves; only what it can serve gets through."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvtransfer.doorbell import Doorbell, DoorbellClient, Listener, pack_moves, unpack_moves
from kvtransfer.layout import Move

EVENT = threading.Event()


def handler(request: dict[str, Any]) -> int:
    kind = request.get("kind")
    if kind == "sum":
        return sum(len(m.src_blocks) for m in unpack_moves(request["moves"]))
    if kind == "wait":  # for a "set" from another connection
        return int(EVENT.wait(10.0))
    if kind == "set":
        EVENT.set()
        return 1
    errors: dict[str, Exception] = {
        "value": ValueError("block 40 is outside this cache of 32 blocks"),
        "timeout": TimeoutError("KV copy passed its deadline"),
        "gone": ConnectionError("KV arena a1 was retired by its owner"),
        "other": KeyError("moves"),
    }
    raise errors[str(kind)]


@pytest.fixture
def bell() -> Iterator[Doorbell]:
    b = Doorbell(handler)
    yield b
    b.close()


def test_moves_survive_packing() -> None:
    moves = [
        Move(0, 1, range(2, 4), range(0, 2), (5, 1, 9), (0, 2, 3)),
        Move(1, 0, range(1), range(3, 4), (7,), (8,)),
    ]
    assert unpack_moves(pack_moves(moves)) == moves


def test_requests_and_errors_round_trip(bell: Doorbell) -> None:
    moves = [Move(0, 0, range(1), range(1), (1, 2, 3), (4, 5, 6))]

    async def main() -> None:
        client = await DoorbellClient.connect(bell.address())
        assert client is not None
        assert await client.call({"kind": "sum", "moves": pack_moves(moves)}) == 3
        for kind, error, text in [
            ("value", ValueError, "block 40 is outside this cache of 32 blocks"),
            ("timeout", TimeoutError, "passed its deadline"),
            ("gone", ConnectionError, "retired by its owner"),
            ("other", RuntimeError, "KeyError: 'moves'"),
        ]:
            with pytest.raises(error, match=text):
                await client.call({"kind": kind})
        assert await client.call({"kind": "sum", "moves": []}) == 0  # still serving
        client.close()

    asyncio.run(main())


def test_clients_are_served_at_the_same_time(bell: Doorbell) -> None:
    """A request that waits for another connection's request: served one at a time,
    it would wait its full 10 s and return 0."""

    async def main() -> list[int]:
        a, b = [await DoorbellClient.connect(bell.address()) for _ in range(2)]
        assert a is not None and b is not None
        waiting = asyncio.ensure_future(a.call({"kind": "wait"}))
        await asyncio.sleep(0.05)
        results = [await b.call({"kind": "set"}), await waiting]
        a.close()
        b.close()
        return results

    EVENT.clear()
    assert asyncio.run(main()) == [1, 1]


def test_unreachable_and_closed_doorbells(bell: Doorbell) -> None:
    async def main() -> None:
        assert await DoorbellClient.connect("\0pdkv-bell-nobody-here") is None
        client = await DoorbellClient.connect(bell.address())
        assert client is not None
        assert await client.call({"kind": "sum", "moves": []}) == 0  # accepted by now
        bell.close()  # stops accepting; the connected client is still served
        assert await client.call({"kind": "sum", "moves": []}) == 0
        assert await DoorbellClient.connect(bell.name) is None
        client._writer.close()  # a connection lost under the client
        with pytest.raises(ConnectionError, match="closed the connection"):
            await client.call({"kind": "sum", "moves": []})

    asyncio.run(main())


def test_a_closed_listener_refuses_new_connections() -> None:
    # close() alone left the socket listening while its accept thread was blocked.
    for _ in range(5):
        listener = Listener("pdkv-test", lambda conn: None)
        name = listener.start()
        time.sleep(0.01)  # the accept thread is now blocked in accept()
        listener.close()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with conn, pytest.raises(ConnectionRefusedError):
            conn.connect(name)
