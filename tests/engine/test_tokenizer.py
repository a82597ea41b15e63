"""Tokenizer loading, special tokens, eos ids and incremental detokenization."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.make_model import make_model
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The river ran slowly past the old mill.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Numbers 1234567 and 3.14159; code: x[i] += f(y) // done",
    "Emoji 🙂🚀🎉 ❤️ and CJK 今天天气很好 東京 서울 — Ελληνικά, русский, café.",
    "🐍",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {arch: make_model(arch, "tiny", root / arch) for arch in ("llama", "qwen3")}


@pytest.fixture(scope="module")
def tok(model_dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dirs["qwen3"])


def test_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_vocab_and_special_ids(model_dirs: dict[str, Path], tok: Tokenizer) -> None:
    assert tok.vocab_size == 512
    assert tok.eos_token_ids == (0,) and tok.bos_token_id == 0
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|pad|>") == 1
    assert tok.token_to_id("no such token") is None
    llama = Tokenizer.from_pretrained(model_dirs["llama"])
    ids = llama.encode("hello")
    assert llama.encode("hello", add_special_tokens=True) == [0, *ids]  # bos, Llama 3 style
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello")


def test_special_tokens_in_text_and_decode(tok: Tokenizer) -> None:
    ids = tok.encode("a<|endoftext|>b")
    assert 0 in ids
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<|endoftext|>b"


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_eos_ids_come_from_generation_config_then_config_then_tokenizer_config(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    d = _copy_tokenizer(model_dirs["qwen3"], tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|pad|>", "special": True}  # AddedToken form
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_pretrained(d).eos_token_ids == (1,)
    (d / "config.json").write_text(json.dumps({"eos_token_id": 7, "bos_token_id": 3}))
    loaded = Tokenizer.from_pretrained(d)
    assert loaded.eos_token_ids == (7,) and loaded.bos_token_id == 3
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    loaded = Tokenizer.from_pretrained(d)
    assert loaded.eos_token_ids == (0, 1) and loaded.bos_token_id == 3


def test_missing_tokenizer_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def _stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random
) -> tuple[list[str], str]:
    """Feed ids in random chunks; every prefix of the output must stay a prefix."""
    deltas: list[str] = []
    i = 0
    while i < len(ids):
        k = rng.randint(1, 3)
        deltas.append(detok.add(ids[i : i + k]))
        i += k
    return deltas, detok.flush()


def test_deltas_concatenate_to_the_full_decode_on_random_streams(tok: Tokenizer) -> None:
    rng = random.Random(0)
    text_ids = [i for t in TEXTS for i in tok.encode(t)]
    for trial in range(300):
        if trial % 2:  # real text: multi-byte characters split across byte tokens
            start = rng.randrange(len(text_ids))
            out = text_ids[start : start + rng.randint(1, 60)]
        else:  # arbitrary ids, invalid UTF-8 included
            out = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 8))]
        detok = IncrementalDetokenizer(tok, prompt)
        deltas, last = _stream(detok, out, rng)
        full = tok.decode(out)
        assert "".join(deltas) + last == full == detok.text
        if trial % 2 and not full.startswith("\ufffd") and not full.endswith("\ufffd"):
            assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_multibyte_character_is_emitted_whole(tok: Tokenizer) -> None:
    ids = tok.encode("a🙂b")
    assert len(ids) > 3  # the emoji spans several byte tokens in a 512 vocab
    detok = IncrementalDetokenizer(tok, [5])
    deltas = [detok.add([i]) for i in ids]
    assert [d for d in deltas if d] == ["a", "🙂", "b"]


def test_stop_string_spanning_deltas_is_never_emitted(tok: Tokenizer) -> None:
    text = "Hello world, stop here please and more"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [5], stop=["stop here"])
    deltas = []
    for i in ids:
        deltas.append(detok.add([i]))
        assert "Hello world, ".startswith("".join(deltas))
    assert detok.stopped
    assert "".join(deltas) + detok.flush() == "Hello world, " == detok.text
    assert detok.add(tok.encode(" more")) == ""


def test_earliest_stop_wins_and_stop_at_start(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [5], stop=["world", "o w"])
    detok.add(tok.encode("Hello world"))
    assert detok.stopped and detok.text + detok.flush() == "Hell"
    detok = IncrementalDetokenizer(tok, [5], stop=["Hel"])
    assert detok.add(tok.encode("Hello")) == "" and detok.stopped and detok.text == ""


def test_held_back_stop_prefix_is_released_by_flush(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [5], stop=["never appears"])
    first = detok.add(tok.encode("abc never"))
    assert not detok.stopped and "abc never".startswith(first)
    assert len("abc never") - len(first) <= len("never appears") - 1
    assert first + detok.flush() == "abc never"


def test_output_text_ignores_a_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    ids = tok.encode("🙂🙂")
    half = len(ids) // 2 + 1  # cuts the second emoji
    detok = IncrementalDetokenizer(tok, ids[:half])
    out = ids[half:]
    assert detok.add(out) + detok.flush() == tok.decode(out)


def test_cost_per_token_is_constant(model_dirs: dict[str, Path], tok: Tokenizer) -> None:
    decoded = 0

    class Counting(Tokenizer):
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            nonlocal decoded
            decoded += len(ids)
            return super().decode(ids, skip_special_tokens)

    counting = Counting.from_pretrained(model_dirs["qwen3"])
    ids = tok.encode(" ".join(TEXTS) * 40)
    detok = IncrementalDetokenizer(counting, [5], stop=["zzz"])
    for i in ids:
        detok.add([i])
    detok.flush()
    assert len(ids) > 1000 and decoded < 12 * len(ids)
    assert detok.text == tok.decode(ids)
