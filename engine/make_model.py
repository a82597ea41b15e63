"""Random-weight Hugging Face checkpoints for tests and CPU benchmarks (no downloads).

``make_model(arch, preset, out_dir)`` writes exactly what a downloaded model directory
holds: ``config.json``, ``generation_config.json``, ``tokenizer.json`` (a real byte-level
BPE trained on ``engine.corpus``), ``tokenizer_config.json`` and ``model.safetensors``
(or shards + ``model.safetensors.index.json``) with Hugging Face tensor names.

The weights are random but scaled so that greedy decoding is decisive (large gaps
between the top two logits) and still depends on the context, so two implementations
of the same model can be compared token for token without flaking on near-ties.
Must not import transformers (a dev-only dependency).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.corpus import EOS_TOKEN, PAD_TOKEN, train_tokenizer

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")
PRESETS = ("tiny", "small", "medium")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

# hidden, layers, heads, kv heads, dense intermediate, vocab, max positions
_DIMS = {
    "tiny": (64, 4, 4, 2, 128, 512, 512),
    "small": (512, 8, 8, 4, 1408, 4096, 2048),
    "medium": (768, 12, 12, 4, 3072, 8192, 4096),
}
# experts, experts per token, expert intermediate size
_MOE = {"tiny": (8, 2, 32), "small": (8, 2, 192), "medium": (16, 4, 192)}
_DEFAULT_SHARD_BYTES = {"tiny": 2**31, "small": 2**31, "medium": 100 * 2**20}

# Init scales (see module docstring). Logit std ~ _LOGIT_STD; each block writes ~_BLOCK_GAIN
# times the embedding scale into the residual so that the current token's embedding does
# not dominate the final state (with tied embeddings it would make the model echo its input).
_LOGIT_STD = 12.0
_BLOCK_GAIN = 3.0
_ROUTER_STD = 3.0
_NORM_JITTER = 0.1
_BIAS_STD = 0.2


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _rope_fields(arch: str, max_pos: int) -> dict[str, Any]:
    theta = 500000.0 if arch == "llama" else 1000000.0
    scaling: dict[str, Any] | None = None
    if arch == "llama":  # Llama-3 scaling; all three frequency bands occur at these dims
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": max_pos // 4,
        }
    params = {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": params}


def _arch_fields(arch: str, preset: str, layers: int) -> dict[str, Any]:
    if arch == "llama":
        return {"mlp_bias": False}
    fields: dict[str, Any] = {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
    }
    if arch == "qwen3_moe":
        experts, top_k, moe_inter = _MOE[preset]
        fields.update(
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=moe_inter,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
    return fields


def preset_config(arch: str, preset: str) -> dict[str, Any]:
    """Return the ``config.json`` dict of ``arch`` at ``preset`` (a fresh dict).

    Rope is written twice, consistently: top-level ``rope_theta`` / ``rope_scaling`` as
    Hub checkpoints carry them, and ``rope_parameters`` as transformers >= 5 saves it.
    Llama uses Llama-3 rope scaling; qwen2 has q/k/v biases; qwen3* decouple head_dim
    from hidden_size / heads like the real Qwen3 models. ValueError on unknown names.
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("preset", preset, PRESETS)
    hidden, layers, heads, kv_heads, inter, vocab, max_pos = _DIMS[preset]
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads if arch in ("llama", "qwen2") else 2 * hidden // heads,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        **_rope_fields(arch, max_pos),
        "attention_bias": arch == "qwen2",
        "attention_dropout": 0.0,
        "tie_word_embeddings": arch != "llama" and preset != "medium",
        "torch_dtype": "float32" if preset == "tiny" else "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        **_arch_fields(arch, preset, layers),
    }


def _is_moe_layer(cfg: dict[str, Any], layer: int) -> bool:
    # Same rule as transformers' Qwen3MoeDecoderLayer.
    return (
        cfg.get("num_experts", 0) > 0
        and layer not in cfg.get("mlp_only_layers", [])
        and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0
    )


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape for a config dict, in checkpoint order."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for name, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[f"{p}self_attn.{name}_proj.weight"] = (out, h)
            if cfg.get("attention_bias"):
                shapes[f"{p}self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if cfg["model_type"] in ("qwen3", "qwen3_moe"):
            shapes[p + "self_attn.q_norm.weight"] = (cfg["head_dim"],)
            shapes[p + "self_attn.k_norm.weight"] = (cfg["head_dim"],)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if _is_moe_layer(cfg, i):
            inter = cfg["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", h, inter))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", h, cfg["intermediate_size"]))
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (inter, hidden),
        prefix + "up_proj.weight": (inter, hidden),
        prefix + "down_proj.weight": (hidden, inter),
    }


def param_count(cfg: dict[str, Any]) -> int:
    """Number of parameters a checkpoint of ``cfg`` holds (tied lm_head counted once)."""
    return sum(math.prod(shape) for shape in tensor_shapes(cfg).values())


def _init_std(name: str, shape: tuple[int, ...], cfg: dict[str, Any]) -> float:
    """Standard deviation of a weight matrix; the why is in the module constants' comment."""
    h = cfg["hidden_size"]
    embed_std = _LOGIT_STD / math.sqrt(h)  # tied: lm_head = embedding
    if name == "model.embed_tokens.weight" or name == "lm_head.weight":
        return embed_std
    if name.endswith("mlp.gate.weight"):
        return _ROUTER_STD / math.sqrt(h)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        # Inputs to o_proj (averaged values) and down_proj (silu(g) * u) have RMS well
        # below 1; the factor 2 roughly compensates so block outputs reach the gain.
        return 2.0 * _BLOCK_GAIN * embed_std / math.sqrt(shape[1])
    return 1.0 / math.sqrt(shape[1])  # q/k/v/gate/up: unit-variance outputs


def _init_tensor(
    name: str, shape: tuple[int, ...], cfg: dict[str, Any], gen: torch.Generator
) -> torch.Tensor:
    if name.endswith("norm.weight"):
        # Near 1 but not exactly: a loader that skips or swaps a norm is caught.
        return 1.0 + _NORM_JITTER * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return _BIAS_STD * torch.randn(shape, generator=gen)
    return _init_std(name, shape, cfg) * torch.randn(shape, generator=gen)


def _plan_shards(
    shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int
) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(
    cfg: dict[str, Any], out_dir: Path, seed: int, dtype: torch.dtype, max_shard_bytes: int
) -> list[Path]:
    """Write ``model.safetensors`` or shards + index; holds one shard in memory at a time."""
    shapes = tensor_shapes(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(shapes, itemsize, max_shard_bytes)
    n = len(shards)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    gen = torch.Generator().manual_seed(seed)  # one stream in fixed order: sharding-proof
    weight_map: dict[str, str] = {}
    for names, fname in zip(shards, files, strict=True):
        shard = {n: _init_tensor(n, shapes[n], cfg, gen).to(dtype).contiguous() for n in names}
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        del shard
    if n > 1:
        total = sum(math.prod(s) for s in shapes.values()) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out_dir / "model.safetensors.index.json", index)
    return [out_dir / f for f in files]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(cfg: dict[str, Any], out_dir: Path) -> int:
    text = train_tokenizer(cfg["vocab_size"], "llama" if cfg["model_type"] == "llama" else "qwen")
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "model_max_length": cfg["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
        },
    )
    return len(json.loads(text)["model"]["vocab"])


def make_model(
    arch: str,
    preset: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint of ``arch`` at ``preset`` into ``out_dir``; return it.

    ``dtype`` defaults to float32 for tiny and bfloat16 otherwise. Weights over
    ``max_shard_bytes`` (default: 100 MiB for medium, 2 GiB otherwise) are sharded as
    ``model-0000K-of-0000N.safetensors`` with ``model.safetensors.index.json``.
    ``config_overrides`` updates the preset's config before weights are made (e.g.
    ``{"mlp_only_layers": [1]}``). The same arguments always give the same bytes.
    """
    cfg = preset_config(arch, preset)
    cfg.update(config_overrides or {})
    dtype = dtype or cfg["torch_dtype"]
    _check_choice("dtype", dtype, tuple(DTYPES))
    cfg["torch_dtype"] = dtype
    max_shard_bytes = max_shard_bytes or _DEFAULT_SHARD_BYTES[preset]
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a re-run with other sharding must not leave old files
    vocab = _write_tokenizer(cfg, out)
    if vocab > cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {vocab} tokens, more than vocab_size={cfg['vocab_size']}")
    _write_json(out / "config.json", cfg)
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    _write_json(out / "generation_config.json", {**gen_cfg, "pad_token_id": cfg["pad_token_id"]})
    write_weights(cfg, out, seed, DTYPES[dtype], max_shard_bytes)
    return out
