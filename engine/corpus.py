"""A small built-in text corpus for training the test tokenizers (no downloads, no torch).

The text below was written for this project and is free to use. It mixes prose, verse,
dialogue, code, numbers and several scripts (Latin with accents, Greek, Cyrillic, CJK,
Korean, emoji) so that byte-level BPE learns multi-byte merges too. ``training_lines``
extends it deterministically (recombined words, compounds, numbers) so that a trainer
can reach a vocabulary of several thousand tokens from a few KB of source text.
"""

from __future__ import annotations

import functools
import random

EOS_TOKEN = "<|endoftext|>"  # also bos, as in Qwen and GPT-2 style vocabularies
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1: the trainer adds them first

BASE_TEXT = """\
The river ran slowly past the old mill, carrying leaves and the last light of the evening.
On the far bank a fisherman folded his nets, counted the day's catch and whistled a tune
that his grandfather had taught him long ago. Nobody in the village remembered the words.
When the bells of the church rang seven times, the baker closed her shop and walked home
along the narrow road between the orchards, where apples hung heavy on every branch.

It was a quiet country, and its people liked it that way. They measured the year by the
harvest and the weather: the wet spring, the hot summer, the long golden autumn and the
winter that came down from the mountains like a wolf. Children learned to read from the
almanac, to count from the market, and to sing from their mothers and the wandering players
who arrived each June with painted carts, tired horses and a thousand stories.

"Where are you going?" asked the girl at the gate.
"North," said the traveller, "to the city with the glass towers, if the road allows."
"And what will you do there?"
"Listen, mostly. Write things down. Come back, perhaps, with something worth telling."
She laughed, because everybody who went north said the same, and nobody ever came back.

Science begins with patience. An astronomer may spend a hundred nights watching one star
before she notices that its brightness changes every three days and eleven hours. A chemist
weighs a powder, dissolves it, heats it, cools it and weighs it again. A biologist counts
seeds, wings, cells and generations. The instruments improve, the computers grow faster,
but the method stays the same: observe carefully, guess boldly, test honestly, repeat.

A language model predicts the next token from the tokens before it. During prefill it reads
the whole prompt at once and stores keys and values for every layer in a cache; during
decode it produces one token per step, reusing that cache. Serving systems batch many
requests together, schedule them under a memory budget, and stream the generated text back
to each client as soon as it is ready. Latency matters: time to first token, time per
output token, and the share of requests that meet both targets.

Recipe for bread: mix 500 g of flour, 10 g of salt, 7 g of yeast and 350 ml of warm water.
Knead for ten minutes, let the dough rise for 1.5 hours, shape it, rise again for 45 minutes
and bake at 230 degrees for about 35 minutes until the crust sounds hollow when tapped.

Prices on 2024-03-15: apples 2.49 per kg, pears 3.10, cheese 18.75, coffee 12.00, tea 6.40.
Call 555-0142 before 09:30 or after 17:45. Order #88213 shipped on Tuesday, 12 November.
The answer is 42; the temperature was -7.5 C; the speed of light is 299792458 m/s.

    def fibonacci(n: int) -> list[int]:
        \"\"\"Return the first n Fibonacci numbers.\"\"\"
        values = [0, 1]
        while len(values) < n:
            values.append(values[-1] + values[-2])
        return values[:n]

    for i, value in enumerate(fibonacci(10)):
        print(f"{i:>2}: {value}")

{"name": "example", "version": "1.2.3", "tags": ["test", "demo"], "enabled": true, "size": 1024}
SELECT name, COUNT(*) AS total FROM orders WHERE status = 'done' GROUP BY name ORDER BY total;
for (int i = 0; i < count; ++i) { sum += data[i] * weight[i]; }  // accumulate
<html><body><p class="note">Hello &amp; welcome!</p></body></html>

The wind whispers over water,
the moon is a coin in the well;
what the morning forgets of the night
only the evening can tell.

Le petit café au coin de la rue ouvre à six heures; on y boit un crème et on lit le journal.
Die Straßenbahn fährt über die Brücke, und die Kinder zählen die Möwen über dem Fluss.
El niño corrió por la playa y encontró una concha rosada junto a las rocas mojadas.
Η θάλασσα ήταν ήρεμη και ο ουρανός καθαρός· οι ψαράδες γύρισαν νωρίς στο λιμάνι.
Утром шёл тихий снег, и весь город казался новым, белым и немного сонным.
今天天气很好，我们一起去公园散步，看见了很多花和小鸟。
東京の朝はとても静かで、駅のホームには新聞を読む人が並んでいた。
서울의 봄은 짧지만 벚꽃이 피면 거리마다 사람들로 가득하다.
Emoji: 🙂 😀 🚀 🌍 🎉 ❤️ 👍 🐍 ☕ 🍎 — and symbols: © ® ™ € £ ¥ § ¶ ° ± × ÷ ≤ ≥ ≠ ∞ √ π Ω.
Quotes “like these” and ‘these’, dashes – and —, an ellipsis… and a bullet • point.

Rules of the road: keep to the right, slow down near schools, never drive tired, and always
let the ambulance pass. Remember that a tired mind makes slow decisions and rash choices.
The committee met on Monday and agreed on three things: the bridge must be repaired before
winter, the library will open on Sundays, and the annual fair will move to the east meadow.

Once upon a time there lived a clockmaker who could not sleep. Every night she sat at her
bench and repaired the watches of the town: silver ones, golden ones, cheap ones with tin
cases and a very old one with a cracked face that belonged to the mayor. One night the old
watch began to tick backwards, and in the morning the mayor woke up ten years younger.
"""

_SYLLABLES = (
    "ka", "lo", "mi", "ren", "sta", "tor", "vel", "qu", "ish", "an", "dor", "el", "fi", "gra",
    "hol", "jin", "ment", "ness", "pro", "sub", "tion", "ure", "wick", "zen", "bri", "cal",
)  # fmt: skip

_SUFFIXES = ("", "s", "ed", "ing", "er", "ly", "ness", "ful", "able", "ment")


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()[]{}<>") for w in text.split() if any(c.isalpha() for c in w)]


def training_lines(num_lines: int = 3000, seed: int = 1234) -> list[str]:
    """Return the base text's lines followed by ``num_lines`` deterministic synthetic lines.

    Synthetic lines recombine the base vocabulary (so frequent English pieces dominate the
    first merges), add suffixed and compound words, pseudo-words from syllables and
    numbers, which give a BPE trainer enough distinct pairs for ~8k merges. The same
    arguments always give the same lines (a private ``random.Random``).
    """
    rng = random.Random(seed)
    base = BASE_TEXT.splitlines()
    words = sorted({w for w in _words(BASE_TEXT) if w}) or ["word"]
    lines = list(base)
    for _ in range(num_lines):
        parts: list[str] = []
        for _ in range(rng.randint(6, 16)):
            roll = rng.random()
            if roll < 0.55:
                parts.append(rng.choice(words) + rng.choice(_SUFFIXES))
            elif roll < 0.7:
                parts.append(rng.choice(words).lower() + rng.choice(words).lower())
            elif roll < 0.9:
                syllables = rng.choices(_SYLLABLES, k=rng.randint(2, 4))
                parts.append("".join(syllables))
            else:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        sentence = " ".join(parts)
        lines.append(sentence[:1].upper() + sentence[1:] + rng.choice(".!?;,"))
    # Keep the real text heavier than the synthetic text in pair counts.
    return lines + base * 4


# Pre-tokenizer regexes of the real tokenizers (transformers rebuilds Qwen's from this
# very pattern, so ours must match it): Llama 3 keeps up to 3 digits together, Qwen one.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKENIZER_STYLES = ("llama", "qwen")


@functools.lru_cache(maxsize=8)
def train_tokenizer(vocab_size: int, style: str = "qwen") -> str:
    """Train a byte-level BPE on the built-in corpus; return its ``tokenizer.json`` text.

    Ids 0 and 1 are ``<|endoftext|>`` (eos and bos) and ``<|pad|>``, then the 256 byte
    symbols, then merges. The pipeline copies the real families': ``"llama"`` (Llama 3:
    regex split, byte level, bos prepended by ``encode(add_special_tokens=True)``) or
    ``"qwen"`` (NFC, Qwen2 regex split, byte level, nothing added). Deterministic: same
    arguments, same bytes. ValueError on a vocab_size under 258 or an unknown style.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    if style not in TOKENIZER_STYLES:
        raise ValueError(f"style must be one of {TOKENIZER_STYLES}, got {style!r}")
    tok = Tokenizer(models.BPE())
    if style == "qwen":
        tok.normalizer = normalizers.NFC()
    pattern = LLAMA3_PATTERN if style == "llama" else QWEN2_PATTERN
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer=trainer)
    steps: list[processors.PostProcessor] = [processors.ByteLevel(trim_offsets=False)]
    if style == "llama":
        bos = processors.TemplateProcessing(
            single=f"{EOS_TOKEN} $A",
            pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B:1",
            special_tokens=[(EOS_TOKEN, 0)],
        )
        steps.append(bos)
    tok.post_processor = processors.Sequence(steps)
    return str(tok.to_str(pretty=True))
