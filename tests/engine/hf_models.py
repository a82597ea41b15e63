"""Tiny checkpoints built with transformers itself: the reference our engine must match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")

_COMMON: dict[str, Any] = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    # Large init so greedy picks are decisive (no near-ties between implementations).
    initializer_range=0.25,
    eos_token_id=None,
    bos_token_id=None,
)


def hf_config(family: str) -> Any:
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(
            **_COMMON,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, tie_word_embeddings=False)
    return tf.Qwen3MoeConfig(
        **_COMMON,
        tie_word_embeddings=True,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    )


def build_hf_model(family: str, out: Path, seed: int = 0) -> Any:
    """Builds, saves (safetensors) and returns a random transformers model in fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    return model


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return [int(t) for t in out[0, len(prompt) :]]
