"""Tokenizer of a Hugging Face model directory and incremental detokenization (no torch).

``Tokenizer`` wraps ``tokenizers.Tokenizer`` loaded from ``DIR/tokenizer.json`` (never
transformers, which is slow to import and a dev-only dependency) and finds the eos/bos
ids the way transformers does. ``IncrementalDetokenizer`` turns a stream of output ids
into text deltas that never split a UTF-8 character or leak part of a stop string.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

# Prompt tokens decoded as left context for the first output token: tokenizers whose
# decoders depend on context (SentencePiece's leading-space rule) need a few.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode yields for an incomplete character


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _as_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json holds special tokens as strings or AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids for one model directory.

    ``eos_token_ids`` come from ``generation_config.json`` (``eos_token_id``, an int or a
    list), else ``config.json``, else ``tokenizer_config.json``'s ``eos_token``; empty
    when none is given. ``bos_token_id`` is found the same way (None when absent).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
    ) -> None:
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.bos_token_id: int | None = bos_token_id

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load ``model_dir/tokenizer.json``; FileNotFoundError names a missing file."""
        root = Path(model_dir)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        tok = tokenizers.Tokenizer.from_file(str(path))
        sources = [_read_json(root / "generation_config.json"), _read_json(root / "config.json")]
        tok_cfg = _read_json(root / "tokenizer_config.json")
        eos: tuple[int, ...] = ()
        bos: int | None = None
        for src in sources:  # the first file that names an id wins
            eos = eos or _as_ids(src.get("eos_token_id"))
            if bos is None and (bos_ids := _as_ids(src.get("bos_token_id"))):
                bos = bos_ids[0]
        if not eos and (name := _token_content(tok_cfg.get("eos_token"))) is not None:
            eos = _as_ids(tok.token_to_id(name))
        if bos is None and (name := _token_content(tok_cfg.get("bos_token"))) is not None:
            bos = tok.token_to_id(name)
        return cls(tok, eos, bos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (bos...)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (lossy: an incomplete UTF-8 character decodes to U+FFFD)."""
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. a special token), None when absent."""
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)


class IncrementalDetokenizer:
    """Output text of one request, produced delta by delta as tokens arrive.

    Like vLLM's: only a small window of ids is decoded per step (``prefix_offset`` ..
    end), so the cost per token is constant. A delta never ends inside a UTF-8 character
    (text is held back while the window's decode ends with U+FFFD), and the last
    ``max(len(stop)) - 1`` characters are held back so that a stop string spanning two
    deltas is never emitted. When a stop string appears the text is truncated before it,
    ``stopped`` turns True and later ``add`` calls return "". ``text`` is the
    concatenation of all deltas returned so far; after ``flush`` it equals
    ``tokenizer.decode(output_ids)`` (up to the stop string).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty, got ''")
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        # A context that ends inside a character would swallow the first output bytes.
        if self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pending = ""  # decoded, not yet returned (a possible stop-string prefix)
        self._chunks: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """All output text returned so far (truncated before a stop string)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _new_text(self, final: bool) -> str:
        """Text that the ids since ``read_offset`` add; '' while a character is incomplete."""
        window = self._ids[self._prefix_offset :]
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(window)
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not final):
            return ""
        # The window's start sits on a character boundary, so its decode extends prefix.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output ids; return the text that became safe to emit (maybe '')."""
        if self.stopped or not token_ids:
            return ""
        self._ids.extend(token_ids)
        # Keep the id list short: everything before prefix_offset is never decoded again.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return self._emit(self._new_text(final=False), final=False)

    def flush(self) -> str:
        """Return all text still held back (an incomplete character decodes to U+FFFD)."""
        if self.stopped:
            return ""
        return self._emit(self._new_text(final=True), final=True)

    def _emit(self, new: str, final: bool) -> str:
        pending = self._pending + new
        # Any stop string completed by ``new`` lies within pending (see the hold-back).
        hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            pending = pending[: min(hits)]
            self.stopped = True
            final = True
        cut = len(pending) if final else max(0, len(pending) - self._hold)
        delta, self._pending = pending[:cut], pending[cut:]
        if delta:
            self._chunks.append(delta)
        return delta
