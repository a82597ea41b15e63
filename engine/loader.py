"""Streaming weight loading from a Hugging Face directory of safetensors files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from engine.families import IGNORED, map_name


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [root / n for n in names]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"shard {f.name} named in {index.name} is missing in {root}"
                )
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {root}")


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, Any]]:
    """Yields (name, lazy slice): a tensor is read only when (and as much as) sliced."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_slice(name)


def load_weights(model: nn.Module, model_type: str, model_dir: str | Path) -> None:
    """Copies every checkpoint tensor into ``model`` (a ``CausalLM``), one at a time.

    A pipeline stage (``model.owns_tensor``) skips the tensors of other stages without
    reading them. Raises ValueError naming a checkpoint tensor with no home in the
    model, or a model parameter the checkpoint did not provide.
    """
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    owns = getattr(model, "owns_tensor", None)
    loaded: set[tuple[str, str, Any]] = set()
    for name, tensor in iter_tensors(model_dir):
        if IGNORED.search(name) or (tied and name == "lm_head.weight"):
            continue
        if owns is not None and not owns(name):
            continue
        target = map_name(model_type, name)
        try:
            module = model.get_submodule(target.module)
        except AttributeError as e:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in a {model_type} model"
            ) from e
        _copy(module, target.param, tensor, target.shard, name)
        loaded.add((target.module, target.param, target.shard))
    _check_complete(model, loaded)


def _copy(module: nn.Module, param: str, tensor: Any, shard: Any, name: str) -> None:
    load = getattr(module, "load", None)
    if load is not None:
        load(param, tensor, shard)
        return
    dest = getattr(module, param, None)
    if not isinstance(dest, nn.Parameter):
        raise ValueError(f"checkpoint tensor {name!r} has no parameter {param!r} to load into")
    src = tensor[:]
    if tuple(src.shape) != tuple(dest.shape):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}"
        )
    dest.data.copy_(src)


def _check_complete(model: nn.Module, loaded: set[tuple[str, str, Any]]) -> None:
    """Every parameter got all its shards (q, k and v; every expert; ...)."""
    got: dict[tuple[str, str], int] = {}
    for module, param, _ in loaded:
        got[(module, param)] = got.get((module, param), 0) + 1
    for full_name, _ in model.named_parameters():
        module, _, param = full_name.rpartition(".")
        num_shards = getattr(model.get_submodule(module), "num_shards", lambda _: 1)(param)
        if got.get((module, param), 0) < num_shards:
            raise ValueError(f"checkpoint has no tensor for (part of) parameter {full_name!r}")
