"""Bad checkpoints and bad requests fail with errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.loader import checkpoint_files
from engine.model_config import ModelConfig
from engine.sampling_params import SamplingParams


def test_unknown_model_type_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_required_field_is_named() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict({"model_type": "llama", "num_attention_heads": 4})


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        checkpoint_files(tmp_path)


def test_no_weights_at_all(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint_files(tmp_path)


def test_unsupported_rope_type() -> None:
    cfg = {
        "model_type": "llama",
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 8,
        "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
    }
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict(cfg)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_values_name_the_value(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_weight_shape_mismatch_is_named(tmp_path: Path, tiny_llama: Path) -> None:
    from safetensors.torch import load_file, save_file

    from decode.llm import LLM

    shutil.copytree(tiny_llama, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="model.norm.weight"):
        LLM.from_pretrained(str(tmp_path / "m"), dtype="float32")
