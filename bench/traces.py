"""Datasets of request lengths (and arrival times) for the load generator.

- The Azure LLM inference traces: ``AzureLLMInferenceTrace_conv.csv`` (19,366
  requests) and ``AzureLLMInferenceTrace_code.csv`` (8,819 requests), columns
  ``TIMESTAMP, ContextTokens, GeneratedTokens``. Source: Azure Public Dataset, "Azure
  LLM inference trace 2023", released with Patel et al., "Splitwise: Efficient
  Generative LLM Inference Using Phase Splitting", ISCA 2024. License: CC-BY 4.0.
  Read from ``../shared/traces`` beside the repository root, or ``$PDSERVE_TRACES``.
- A synthetic distribution (uniform, lognormal or fixed, with given means).
- A JSONL file of ``{"prompt_len": P, "output_len": O[, "timestamp": T]}`` (T in s).

No torch import.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, replace
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

TRACES_ENV = "PDSERVE_TRACES"
AZURE_TRACES = {
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "azure-code": "AzureLLMInferenceTrace_code.csv",
}
SYNTHETIC_DISTS = ("uniform", "lognormal", "fixed")


def traces_dir() -> Path:
    """``$PDSERVE_TRACES`` if set, else ``shared/traces`` beside the repository root."""
    env = os.environ.get(TRACES_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "traces"


@dataclass(frozen=True)
class Trace:
    """Request lengths of a dataset, with arrival timestamps (seconds from the first
    request) when the dataset has them."""

    name: str
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    timestamps_s: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompt_lens)
        if n == 0:
            raise ValueError(f"trace {self.name!r} is empty")
        if len(self.output_lens) != n or (
            self.timestamps_s is not None and len(self.timestamps_s) != n
        ):
            raise ValueError(f"trace {self.name!r}: columns of different lengths")

    def __len__(self) -> int:
        return len(self.prompt_lens)


def _seconds_of_day(clock: str) -> float:
    hh, mm, ss = clock.split(":")
    return int(hh) * 3600 + int(mm) * 60 + float(ss)


@lru_cache(maxsize=4)
def _load_azure(path: Path) -> Trace:
    prompts: list[int] = []
    outputs: list[int] = []
    times: list[float] = []
    day0: date | None = None
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[1:3]] != [
            "ContextTokens",
            "GeneratedTokens",
        ]:
            raise ValueError(f"{path}: expected columns TIMESTAMP,ContextTokens,GeneratedTokens")
        for lineno, row in enumerate(reader, start=2):
            try:
                day_s, clock = row[0].strip().split(" ")
                day = date.fromisoformat(day_s)
                day0 = day0 or day
                t = (day - day0).days * 86400 + _seconds_of_day(clock)
                prompts.append(int(row[1]))
                outputs.append(int(row[2]))
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{lineno}: bad row {row!r} ({e})") from e
            times.append(t)
    t0 = times[0] if times else 0.0
    return Trace(
        path.stem,
        tuple(prompts),
        tuple(outputs),
        tuple(t - t0 for t in times),
    )


def load_azure(name: str, directory: Path | None = None) -> Trace:
    """The Azure LLM inference trace ``name`` (``azure-conv`` or ``azure-code``; Patel et
    al., Splitwise, ISCA 2024, CC-BY 4.0) with its timestamps in seconds from the first
    request. Parsed once per process."""
    if name not in AZURE_TRACES:
        raise ValueError(f"unknown Azure trace {name!r}; choose from {sorted(AZURE_TRACES)}")
    path = (directory or traces_dir()) / AZURE_TRACES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set ${TRACES_ENV} to the traces folder)")
    return replace(_load_azure(path.resolve()), name=name)


def _positive_int(obj: dict[str, Any], key: str, where: str) -> int:
    if key not in obj:
        raise ValueError(f"{where}: missing {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def load_jsonl(path: Path | str) -> Trace:
    """Lengths (and timestamps, in seconds) from a JSONL file, one object per line:
    ``{"prompt_len": P, "output_len": O[, "timestamp": T]}``. Blank lines are skipped.
    Timestamps are all present or all absent and never decrease. A bad line raises
    ValueError naming the file and line number."""
    path = Path(path)
    prompts: list[int] = []
    outputs: list[int] = []
    times: list[float] = []
    without_time = 0
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            prompts.append(_positive_int(obj, "prompt_len", where))
            outputs.append(_positive_int(obj, "output_len", where))
            if "timestamp" not in obj:
                without_time += 1
                if times:
                    raise ValueError(f"{where}: missing 'timestamp' (earlier lines have one)")
                continue
            ts = obj["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
                raise ValueError(f"{where}: timestamp must be a finite number, got {ts!r}")
            if without_time:
                raise ValueError(f"{where}: has a 'timestamp' but earlier lines do not")
            if times and ts < times[-1]:
                raise ValueError(f"{where}: timestamp {ts} is before the previous {times[-1]}")
            times.append(float(ts))
    if not prompts:
        raise ValueError(f"{path}: no requests")
    stamps = tuple(t - times[0] for t in times) if times else None
    return Trace(path.stem, tuple(prompts), tuple(outputs), stamps)


@dataclass(frozen=True)
class SyntheticLengths:
    """A synthetic length distribution with the given means.

    ``uniform``: integers uniform in ``mean·(1 ± spread)``; ``lognormal``: σ = ``spread``
    and μ chosen so the mean is ``mean``; ``fixed``: always the mean. Values are rounded
    and at least 1."""

    dist: str = "uniform"
    prompt_mean: float = 128.0
    output_mean: float = 32.0
    spread: float = 0.5

    def __post_init__(self) -> None:
        if self.dist not in SYNTHETIC_DISTS:
            raise ValueError(f"unknown synthetic dist {self.dist!r}; choose from {SYNTHETIC_DISTS}")
        for name in ("prompt_mean", "output_mean"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.spread < (1 if self.dist == "uniform" else math.inf):
            raise ValueError(f"spread must be in [0, 1) for uniform, >= 0 else; got {self.spread}")

    def _draw(self, mean: float, n: int, rng: np.random.Generator) -> list[int]:
        if self.dist == "fixed":
            x = np.full(n, mean)
        elif self.dist == "uniform":
            x = rng.uniform(mean * (1 - self.spread), mean * (1 + self.spread), n)
        else:
            sigma = self.spread
            x = rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, n)
        return [max(1, round(float(v))) for v in x]

    def sample(self, n: int, seed: int = 0) -> Trace:
        """``n`` (prompt, output) pairs, deterministic for a seed; no timestamps."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rng = np.random.default_rng(seed)
        prompts = self._draw(self.prompt_mean, n, rng)
        outputs = self._draw(self.output_mean, n, rng)
        return Trace(f"synthetic-{self.dist}", tuple(prompts), tuple(outputs))


def load_dataset(dataset: str, num_requests: int, seed: int, synthetic: SyntheticLengths) -> Trace:
    """``azure-conv``, ``azure-code``, ``synthetic`` or a path to a ``.jsonl`` file."""
    if dataset in AZURE_TRACES:
        return load_azure(dataset)
    if dataset == "synthetic":
        return synthetic.sample(num_requests, seed)
    if dataset.endswith(".jsonl"):
        return load_jsonl(dataset)
    raise ValueError(
        f"unknown dataset {dataset!r}; choose azure-conv, azure-code, synthetic or FILE.jsonl"
    )
