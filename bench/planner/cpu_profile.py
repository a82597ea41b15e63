"""Step times of one CPU worker, measured (a CPU has no useful roofline here: Python,
the allocator and small-matrix GEMM paths dominate small models).

``measured_latency_model(model_dir)`` builds the real engine for the checkpoint
(one ``tp = pp = 1`` instance, ``threads`` threads, the engine's default scheduler
limits), times the synthetic steps of the start-up profile (``router.routing.Router
.profile``, the same as a served instance runs) and returns the fitted
``LatencyModel``. The result is cached as JSON under ``$PDSERVE_CACHE`` (default
``~/.cache/pdserve``) keyed by the checkpoint's files, the settings and the torch
version, so a second plan costs nothing. ``load_latency_model(path)`` reads a model
saved by ``LatencyModel.to_dict()`` (or a cache file).

Torch and the engine are imported only when measuring.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from router.latency_model import LatencyModel

CACHE_ENV = "PDSERVE_CACHE"
PROFILE_VERSION = 1  # bump when the measurement changes
BLOCK_SIZE = 16
PROFILE_SEQUENCES = 16  # the KV pool profiled holds this many full-length sequences
# Longest sequence profiled: the fit extrapolates beyond (its terms are linear and
# quadratic in the lengths); longer prompts would make the profile of a small model
# take most of a minute on 2 cores.
PROFILE_MAX_LEN = 1024


def cache_dir() -> Path:
    """``$PDSERVE_CACHE`` or ``~/.cache/pdserve``, plus ``/latency``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pdserve"
    return Path(root) / "latency"


def load_latency_model(path: str | Path) -> LatencyModel:
    """A ``LatencyModel`` from a JSON file of ``LatencyModel.to_dict()`` (or a cache
    file holding one under ``latency_model``); ValueError naming a bad file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from e
    if isinstance(data, dict) and "latency_model" in data:
        data = data["latency_model"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (LatencyModel.to_dict())")
    return LatencyModel.from_dict(data)


def _fingerprint(model_dir: Path, settings: dict[str, Any]) -> str:
    """A key for the checkpoint (file names, sizes, times) and the settings."""
    import torch

    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in model_dir.iterdir())
    blob = json.dumps(
        {
            "dir": str(model_dir.resolve()),
            "files": files,
            "settings": settings,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "version": PROFILE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _measure(model_dir: Path, threads: int, dtype: str) -> LatencyModel:
    """Profiles one in-process instance of the checkpoint."""
    from decode.llm import LLM
    from engine.config import CacheConfig, EngineConfig
    from engine.model_config import ModelConfig
    from router.config import RouterConfig
    from router.routing import Router

    max_len = min(ModelConfig.from_pretrained(model_dir).max_position_embeddings, PROFILE_MAX_LEN)
    blocks = -(-PROFILE_SEQUENCES * max_len // BLOCK_SIZE)
    llm_cfg = EngineConfig(
        model=str(model_dir),
        dtype=dtype,
        num_threads=threads,
        max_model_len=max_len,
        cache=CacheConfig(BLOCK_SIZE, num_blocks=blocks, enable_prefix_caching=False),
    )
    llm = LLM(llm_cfg)
    try:
        router = Router(RouterConfig())
        router.profile("cpu", llm, prefill=True, decode=True)
        return router.model("cpu")
    finally:
        llm.shutdown()


def measured_latency_model(
    model_dir: str | Path, threads: int = 1, dtype: str = "auto", refresh: bool = False
) -> LatencyModel:
    """The fitted step-time model of one CPU worker of ``threads`` threads running
    ``model_dir`` (needs its weights), measured once and cached (``refresh``: measure
    again)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    settings = {
        "threads": threads,
        "dtype": dtype,
        "sequences": PROFILE_SEQUENCES,
        "max_len": PROFILE_MAX_LEN,
    }
    cached = cache_dir() / f"{_fingerprint(path, settings)}.json"
    if cached.is_file() and not refresh:
        return load_latency_model(cached)
    model = _measure(path, threads, dtype)
    cached.parent.mkdir(parents=True, exist_ok=True)
    body = {"model": str(path), "settings": settings, "latency_model": model.to_dict()}
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(cached)  # atomic: concurrent planners never read half a file
    return model
