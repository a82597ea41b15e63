"""A CPU KV pool in one anonymous shared-memory file, so that same-host peers can
write a transfer's blocks straight into it (the ``local`` KV transport's one-copy path).

The file (``memfd``, no name in the file system) holds a 64-byte header, then every
layer's K and V tensors back to back. A peer gets the file descriptor over a unix
socket (SCM_RIGHTS) and maps it with :func:`map_arena`. Header: word 0 is ``LIVE``
while the pool is in use; :meth:`KVArena.retire` (the engine reallocated its pool)
clears it, so a peer that still maps a retired pool sees it before and after writing
and fails the transfer instead of writing where nobody reads.
"""

from __future__ import annotations

import math
import mmap
import os
import uuid
from dataclasses import dataclass

import numpy as np
import torch

HEADER_BYTES = 64
LIVE = 0x706473657276654B  # "pdserveK"
_ALIGN = 64

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ArenaInfo:
    """What a peer needs to map an arena: its id, file size and cache geometry
    (``num_layers`` (K, V) pairs of ``shape`` in ``dtype``)."""

    arena_id: str
    nbytes: int
    num_layers: int
    shape: tuple[int, int, int, int]
    dtype: str


def shared_memory_supported() -> bool:
    """True where anonymous shared files exist (Linux)."""
    return hasattr(os, "memfd_create")


def _tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes one cache tensor takes in the file, rounded up to the alignment."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return -(-size // _ALIGN) * _ALIGN


def _map(fd: int, nbytes: int) -> torch.Tensor:
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)


def _map_populated(fd: int, nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Maps ``fd`` with its page tables filled in now. A peer's fresh mapping would
    otherwise take one page fault per 4 KiB page on its first write there, which cost a
    transfer more than its copy did (8 MiB of scattered blocks: 7-10 ms instead of 3-5 ms
    here); filling them costs ~90 ms per GiB of pool, once per mapping."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(fd, nbytes, flags=flags)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def _caches(buffer: torch.Tensor, info: ArenaInfo) -> list[KVCache]:
    dtype = getattr(torch, info.dtype)
    per = _tensor_bytes(info.shape, dtype)
    out: list[KVCache] = []
    for i in range(info.num_layers):
        base = HEADER_BYTES + 2 * i * per
        k, v = (
            buffer[off : off + per].view(dtype)[: math.prod(info.shape)].view(info.shape)
            for off in (base, base + per)
        )
        out.append((k, v))
    return out


class KVArena:
    """One rank's KV caches (``num_layers`` zeroed (K, V) pairs of ``shape``) in one
    shared file; ``caches`` are ordinary CPU tensors over it."""

    def __init__(self, num_layers: int, shape: tuple[int, int, int, int], dtype: torch.dtype):
        if not shared_memory_supported():
            raise OSError("shared-memory KV pools need os.memfd_create (Linux)")
        if num_layers < 1 or min(shape) < 1:
            raise ValueError(f"a KV arena needs layers and a shape >= 1, got {num_layers} {shape}")
        name = str(dtype).removeprefix("torch.")
        nbytes = HEADER_BYTES + 2 * num_layers * _tensor_bytes(shape, dtype)
        self.info = ArenaInfo(uuid.uuid4().hex, nbytes, num_layers, shape, name)
        self.fd = os.memfd_create(f"pdserve-kv-{self.info.arena_id[:8]}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)
        self.buffer = _map(self.fd, nbytes)
        self.buffer.zero_()  # fault every page in now, not during steps or transfers
        self.buffer[:8].view(torch.int64)[0] = LIVE
        self.caches = _caches(self.buffer, self.info)

    def retire(self) -> None:
        """Marks the pool dead for peers and closes its file (mappings stay valid until
        their tensors are freed). Idempotent."""
        if self.fd < 0:
            return
        self.buffer[:8].view(torch.int64)[0] = 0
        os.close(self.fd)
        self.fd = -1


class MappedArena:
    """A peer's view of another process's arena: its caches, mapped from ``fd``."""

    def __init__(self, fd: int, info: ArenaInfo):
        size = os.fstat(fd).st_size
        if size != info.nbytes:
            raise ValueError(
                f"KV arena {info.arena_id}: file has {size} bytes, expected {info.nbytes}"
            )
        self.info = info
        # The mmap must outlive every tensor over it; it is unmapped when both are gone.
        self._mmap, self.buffer = _map_populated(fd, info.nbytes)
        self.caches = _caches(self.buffer, info)
        # read twice per transfer: a numpy scalar read is ~20x cheaper than torch's
        self._header = np.frombuffer(self._mmap, dtype=np.int64, count=1)

    @property
    def live(self) -> bool:
        """False once the owner retired the pool."""
        return int(self._header[0]) == LIVE
