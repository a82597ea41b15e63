"""The tensors one forward pass needs, built by the model runner for a scheduled step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")


@dataclass
class ForwardBatch:
    """A step's flattened tokens: prefill rows first (ragged, ``num_prefill_tokens`` of
    them over ``cu_seqlens_q``), then one row per decoding sequence.

    ``slot_mapping[i]`` is the cache slot token i's K/V go to; ``logits_indices`` are the
    rows whose next token is sampled.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    num_prefill_tokens: int
    prefill_cu_seqlens_q: torch.Tensor
    prefill_context_lens: torch.Tensor
    prefill_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor
    decode_block_tables: torch.Tensor
    logits_indices: torch.Tensor
    _memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def memo(self, key: str, make: Callable[[], _T]) -> _T:
        """``make()``, computed on the first call with ``key`` and shared by every later
        one: what all layers derive alike from this step's tensors (attention plans,
        rotary tables) is derived once per step, not once per layer."""
        if key not in self._memo:
            self._memo[key] = make()
        value: _T = self._memo[key]
        return value

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
