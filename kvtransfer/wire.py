"""What the transports put on the wire besides raw KV: the transfer header that both
ends compare before any byte moves, and tensors over received bytes (torch)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from kvtransfer.blocks import DTYPES, KVView, dtype_name

BytesLike = bytes | bytearray | memoryview | np.ndarray


def geometry(view: KVView, num_pieces: int) -> list[int]:
    """A transfer header: ``[dtype code, block_size, head_dim, pieces]`` (dtype codes:
    positions in DTYPES); both ends compute it, the destination compares."""
    return [list(DTYPES).index(dtype_name(view.dtype)), view.block_size, view.head_dim, num_pieces]


def check_geometry(want: Sequence[int], got: Sequence[int]) -> None:
    """ValueError naming the first field of the source's header ``got`` that differs
    from the destination's ``want`` (see :func:`geometry`)."""
    codes = list(DTYPES)
    for name, w, g in zip(("dtype", "block_size", "head_dim", "pieces"), want, got, strict=True):
        if w == g:
            continue
        if name == "dtype":
            g_name = codes[g] if 0 <= g < len(codes) else f"code {g}"
            raise ValueError(f"dtype mismatch: destination holds {codes[w]}, source sent {g_name}")
        raise ValueError(f"{name} mismatch: destination expects {w}, source sent {g}")


def refused(header: Sequence[int], answer: Sequence[int]) -> None:
    """Source side: ValueError if the destination's ``answer`` ``[status, *its
    geometry]`` refuses the transfer (naming the field that differs, if one does)."""
    if answer[0] == 0:
        return
    check_geometry(answer[1:], header)
    raise ValueError("destination refused the moves (layers, heads or blocks it lacks)")


def as_bytes(tensor: Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a flat uint8 numpy array (no copy)."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError(f"need a contiguous CPU tensor, got device {tensor.device}")
    return tensor.reshape(-1).view(torch.uint8).numpy()


def from_bytes(buf: BytesLike, dtype: torch.dtype, shape: Sequence[int], offset: int = 0) -> Tensor:
    """A tensor over ``buf``'s bytes from ``offset`` (no copy; ``buf`` may be read-only:
    the result must then only be read); ValueError if the sizes disagree."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    want = itemsize * int(np.prod(shape))
    got = (buf.nbytes if isinstance(buf, np.ndarray) else memoryview(buf).nbytes) - offset
    if got != want:
        raise ValueError(
            f"payload of {tuple(shape)} {dtype_name(dtype)}: expected {want} bytes, got {got}"
        )
    with warnings.catch_warnings():  # read-only buffers: we only read them
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=want, offset=offset)
    return flat.view(dtype).view(tuple(shape))
