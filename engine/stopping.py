"""When a sequence stops after its newest token (no torch). Stop strings are found by
the detokenizer, which owns the text."""

from __future__ import annotations

from collections.abc import Collection

from engine.sequence import FinishReason, Sequence


def check_stop(
    seq: Sequence, eos_token_ids: Collection[int], max_model_len: int
) -> FinishReason | None:
    """The reason ``seq`` finishes with its last token, or None to keep going."""
    last = seq.token_ids[-1]
    params = seq.params
    if not params.ignore_eos and last in eos_token_ids:
        return FinishReason.STOP
    if last in params.stop_token_ids:
        return FinishReason.STOP
    if seq.num_output_tokens >= params.max_tokens or len(seq) >= max_model_len:
        return FinishReason.LENGTH
    return None
