"""Paged attention: a torch reference (the CPU path) and Triton kernels (the CUDA path).

Both backends share one contract and one cache layout, documented in
``engine.attention.reference``. ``get_attention_backend`` picks one at run time; the
Triton module is imported only then, so importing this package never needs a GPU or
Triton.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.attention import cpu_decode, reference

__all__ = [
    "AttentionBackend",
    "AttentionBackendImpl",
    "get_attention_backend",
    "triton_available",
]

BACKEND_NAMES = ("auto", "torch", "triton")


class StoreKVFn(Protocol):
    def __call__(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        plan: Any = None,
    ) -> None: ...


class PrefillFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
    ) -> torch.Tensor: ...


class DecodeFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
        plan: Any = None,
    ) -> torch.Tensor: ...


class PlanStoreFn(Protocol):
    def __call__(self, slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> Any: ...


class PlanDecodeFn(Protocol):
    def __call__(
        self, context_lens: torch.Tensor, block_tables: torch.Tensor, k_cache: torch.Tensor
    ) -> Any: ...


class AttentionBackend(Protocol):
    """The three paged-attention operations; see ``engine.attention.reference``.

    ``plan_store``/``plan_decode`` derive once per step what every layer's ``store_kv``
    and ``decode_attention`` would otherwise derive alike from the step's slots and
    tables; the layers pass the result as ``plan`` (a backend that needs none returns
    None and ignores it)."""

    @property
    def name(self) -> str: ...
    @property
    def store_kv(self) -> StoreKVFn: ...
    @property
    def prefill_attention(self) -> PrefillFn: ...
    @property
    def decode_attention(self) -> DecodeFn: ...
    @property
    def plan_store(self) -> PlanStoreFn: ...
    @property
    def plan_decode(self) -> PlanDecodeFn: ...


@dataclass(frozen=True)
class AttentionBackendImpl:
    """A named bundle of the three operations (satisfies ``AttentionBackend``)."""

    name: str
    store_kv: StoreKVFn
    prefill_attention: PrefillFn
    decode_attention: DecodeFn
    plan_store: PlanStoreFn
    plan_decode: PlanDecodeFn


# Decode on fp32 CPU caches goes through a small C kernel (``cpu_decode``) where it
# builds; everything else is the reference.
TORCH_BACKEND = AttentionBackendImpl(
    "torch",
    reference.store_kv,
    reference.prefill_attention,
    cpu_decode.decode_attention,
    reference.plan_store,
    reference.plan_decode,
)


def triton_available() -> bool:
    """Whether ``import triton`` works here (it may be missing off Linux)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _triton_backend() -> AttentionBackendImpl:
    from engine.attention import triton_kernels

    return AttentionBackendImpl(
        "triton",
        triton_kernels.store_kv,
        triton_kernels.prefill_attention,
        triton_kernels.decode_attention,
        triton_kernels.plan_store,
        triton_kernels.plan_decode,
    )


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """Pick the attention implementation for tensors on ``device``.

    ``auto``: Triton on CUDA when it imports, else torch. ``torch``: always the
    reference. ``triton``: CUDA, or CPU only under ``TRITON_INTERPRET=1`` (tests).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention backend must be one of {BACKEND_NAMES}, got {name!r}")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if name == "torch" or (name == "auto" and not (on_cuda and triton_available())):
        return TORCH_BACKEND
    if not triton_available():
        raise ValueError("attention backend 'triton' requested but triton is not installed")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"attention backend 'triton' on device {device} needs CUDA, or "
            "TRITON_INTERPRET=1 (the slow interpreter, for tests)"
        )
    return _triton_backend()
