"""One benchmark run of one system on one checkpoint, in its own process (see engine.py).

Prints one JSON line: prefill tok/s, decode tok/s per batch size, peak RSS, and for
pdserve the memory-bandwidth floor of a batch-1 decode step.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("bench/results")
MODELS = Path("models")


def model_dir(arch: str, preset: str) -> Path:
    path = MODELS / f"bench-{arch}-{preset}"
    if not (path / "config.json").is_file():
        from engine.make_model import make_model

        make_model(arch, preset, path, seed=0)
    return path


TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
AZURE_CONV = "AzureLLMInferenceTrace_conv.csv"  # Azure LLM inference trace 2023, CC-BY 4.0
AZURE_CONV_P99_OUTPUT = 601


def output_lengths(batch: int, output_len: int, dist: str, rng: random.Random) -> list[int]:
    """Mixed output lengths: ``uniform`` in [output_len/2, output_len], or ``azure-conv``
    drawn from the Azure conversation trace (Patel et al., Splitwise, ISCA 2024; CC-BY
    4.0) scaled so its p99 (601 tokens) maps to ``output_len``."""
    if dist == "uniform":
        return [rng.randint(max(1, output_len // 2), output_len) for _ in range(batch)]
    if dist != "azure-conv":
        raise ValueError(f"unknown output distribution {dist!r} (uniform, azure-conv)")
    path = TRACES / AZURE_CONV
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the traces live in ../shared/traces")
    with path.open() as f:
        lengths = [int(row["GeneratedTokens"]) for row in csv.DictReader(f)]
    scale = output_len / AZURE_CONV_P99_OUTPUT
    return [min(output_len, max(1, round(rng.choice(lengths) * scale))) for _ in range(batch)]


def workload(
    batch: int, prompt_len: int, output_len: int, vocab: int, dist: str = "uniform"
) -> tuple[list[list[int]], list[int]]:
    """Random prompts of ``prompt_len`` tokens and mixed output lengths."""
    rng = random.Random(batch)
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    return prompts, output_lengths(batch, output_len, dist, rng)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth_gb_s(device: str = "cpu", nbytes: int = 512 << 20) -> float:
    """Read+write traffic of a large tensor copy on ``device``, best of 5."""
    src = torch.rand(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (first-touch pages, CUDA context)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


class Ours:
    def __init__(self, path: Path, threads: int, dtype: str, device: str):
        from decode.llm import LLM
        from engine.config import CacheConfig, EngineConfig, SchedulerConfig

        self.llm = LLM(
            EngineConfig(
                model=str(path),
                dtype=dtype,
                device=device,
                num_threads=threads,
                cache=CacheConfig(kv_cache_bytes=512 << 20, enable_prefix_caching=False),
                scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192),
            )
        )
        self.params = sum(p.numel() for p in self.llm.runner.model.parameters())

    def run(self, prompts: list[list[int]], outs: list[int]) -> tuple[float, float]:
        """(seconds until every first token, seconds of the decode phase after that)."""
        from engine.sampling_params import SamplingParams

        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outs]
        t0 = time.monotonic()
        res = self.llm.generate(prompts, params)
        prefill_end = max(r.first_token_time or t0 for r in res)
        end = max(r.finish_time or t0 for r in res)
        return prefill_end - t0, end - prefill_end


class HF:
    def __init__(self, path: Path, threads: int, dtype: str, device: str):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.device = device
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model: Any = model.to(device).eval()
        self.params = sum(p.numel() for p in self.model.parameters())

    def _gen(self, prompts: list[list[int]], n: int) -> None:
        ids = torch.tensor(prompts, device=self.device)
        with torch.no_grad():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        sync(self.device)

    def run(self, prompts: list[list[int]], outs: list[int]) -> tuple[float, float]:
        """Static batching runs every row to the longest output; prefill timed apart."""
        t0 = time.perf_counter()
        self._gen(prompts, 1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._gen(prompts, max(outs))
        return prefill, time.perf_counter() - t0 - prefill


def measure(system: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    warm_p, warm_o = workload(2, 16, 4, vocab)
    system.run(warm_p, warm_o)
    prompts, outs = workload(8, args.prompt_len * 2, 1, vocab)
    if args.device != "cpu":  # JIT kernels (Triton, cuBLAS heuristics) compile per shape
        system.run(prompts, outs)
    prefill_s, _ = system.run(prompts, outs)
    res["prefill_tok_s"] = sum(map(len, prompts)) / prefill_s
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts, outs = workload(b, args.prompt_len, args.output_len, vocab, args.output_dist)
        _, decode_s = system.run(prompts, outs)
        # Useful tokens only: the first token of each request belongs to prefill.
        res[f"decode_tok_s_b{b}"] = (sum(outs) - b) / decode_s
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=("pdserve", "transformers"), required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--arch", default="llama")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--output-dist", default="uniform", choices=("uniform", "azure-conv"))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    path = model_dir(args.arch, args.preset)
    config = json.loads((path / "config.json").read_text())
    vocab = config["vocab_size"]
    from engine.model_runner import resolve_dtype

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, config.get("torch_dtype", "float32"), args.device)
    kind: Any = Ours if args.system == "pdserve" else HF
    system: Any = kind(path, args.threads, dtype, args.device)
    res = measure(system, args, vocab)
    res.update(params=system.params, dtype=dtype)
    if args.system == "pdserve":
        from engine.layout import kv_bytes_per_token
        from engine.model_config import ModelConfig

        cfg = ModelConfig.from_pretrained(path)
        ctx = args.prompt_len + args.output_len // 2
        width = 4 if dtype == "float32" else 2
        res["bytes_per_step"] = system.params * width + ctx * kv_bytes_per_token(cfg, dtype, 1)
        res["copy_gb_s"] = copy_bandwidth_gb_s(args.device)
        res["floor_step_ms"] = res["bytes_per_step"] / (res["copy_gb_s"] * 1e9) * 1e3
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        res["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
