"""Checkpoint name tables: Hugging Face tensor names → (our module, param, shard).

One table per family; the loader applies the first matching rule. Names with no rule
map to themselves (``a.b.weight`` → module ``a.b``, param ``weight``, shard 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """``pattern`` matches an HF name; ``module`` is its replacement (regex groups
    allowed); ``shard`` is a constant or, for experts, built from the match."""

    pattern: re.Pattern[str]
    module: str
    shard: Any


def _rule(pattern: str, module: str, shard: Any) -> Rule:
    return Rule(re.compile(pattern), module, shard)


_DENSE = (
    _rule(r"^(model\.layers\.\d+\.self_attn)\.q_proj\.(weight|bias)$", r"\1.qkv_proj", 0),
    _rule(r"^(model\.layers\.\d+\.self_attn)\.k_proj\.(weight|bias)$", r"\1.qkv_proj", 1),
    _rule(r"^(model\.layers\.\d+\.self_attn)\.v_proj\.(weight|bias)$", r"\1.qkv_proj", 2),
    _rule(r"^(model\.layers\.\d+\.mlp)\.gate_proj\.(weight)$", r"\1.gate_up_proj", 0),
    _rule(r"^(model\.layers\.\d+\.mlp)\.up_proj\.(weight)$", r"\1.gate_up_proj", 1),
)

_EXPERT_PROJ = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}

# transformers writes per-expert tensors (what real Qwen3-MoE checkpoints hold).
_MOE = (
    _rule(
        r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$",
        r"\1.experts",
        "expert",
    ),
)

FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
    "llama": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "qwen3_moe": _DENSE + _MOE,
}

# Buffers some exporters write that carry no weights.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.)")


@dataclass(frozen=True)
class Target:
    module: str
    param: str
    shard: Any


def map_name(model_type: str, name: str) -> Target:
    """Where checkpoint tensor ``name`` goes in our model."""
    for rule in FAMILY_RULES[model_type]:
        m = rule.pattern.match(name)
        if m is None:
            continue
        module = m.expand(rule.module)
        if rule.shard == "expert":
            expert, proj = int(m.group(2)), m.group(3)
            which = _EXPERT_PROJ[proj]
            return Target(module, "w2" if which == 2 else "w13", (expert, which))
        return Target(module, m.group(2), rule.shard)
    module, _, param = name.rpartition(".")
    return Target(module, param, 0)
