"""`pdserve plan memory` end to end through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.layout import plan_memory
from engine.make_model import make_model
from engine.model_config import ModelConfig
from router.cli import main

GiB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("llama", "tiny", tmp_path_factory.mktemp("plan") / "llama")


def test_plan_memory_table(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "memory", "--model", str(tiny), "--device-memory", "1GiB", "--tp", "2"]
    assert main([*args, "--context-len", "256"]) == 0
    out = capsys.readouterr().out
    plan = plan_memory(ModelConfig.from_pretrained(tiny), GiB, 0.2, tp=2, context_len=256)
    assert "tp=2 pp=1 (2 devices), float32" in out
    assert f"({plan.weights_per_rank:,} B)" in out
    assert f"KV bytes per token   {plan.kv_bytes_per_token:,} B per rank" in out
    assert f"KV blocks            {plan.kv_blocks:,}\n" in out
    assert f"KV tokens            {plan.kv_tokens:,}\n" in out
    assert "context length       256 tokens = 16 blocks" in out
    assert f"max concurrent seqs  {plan.max_concurrent_seqs:,}\n" in out
    assert out.rstrip().endswith("fits                 yes")


def test_plan_memory_json(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "memory", "--model", str(tiny), "--device-memory", "512MiB", "--json"]
    assert main([*argv, "--reserve", "0.5", "--pp", "2", "--dtype", "bfloat16"]) == 0
    got = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.from_pretrained(tiny)
    plan = plan_memory(cfg, 512 * 2**20, 0.5, pp=2, dtype="bfloat16")
    assert got["model"] == str(tiny)
    assert got["kv_blocks"] == plan.kv_blocks > 0
    assert got["context_len"] == cfg.max_position_embeddings == 512
    assert (got["tp"], got["pp"], got["dtype"], got["fits"]) == (1, 2, "bfloat16", True)
    assert got["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # 2 layers per stage, bf16
    assert main([*argv, "--pp", "2", "--dtype", "bfloat16", "--pp-boundaries", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 2  # stages of 1 and 3 layers
    assert main([*argv, "--pp", "2", "--pp-boundaries", "4"]) == 2
    assert "pp_boundaries=(4,) must be < num_hidden_layers=4" in capsys.readouterr().err


def test_plan_memory_bad_tp(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "memory", "--model", str(tiny), "--device-memory", "1GiB", "--tp", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tp=3 does not divide num_attention_heads=4: valid tp values are 1, 2, 4" in err


def test_plan_memory_bad_pp_and_size(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", "memory", "--model", str(tiny)]
    assert main([*base, "--device-memory", "1GiB", "--pp", "5"]) == 2
    assert "pp=5 is not between 1 and num_hidden_layers=4" in capsys.readouterr().err
    assert main([*base, "--device-memory", "80 gigs"]) == 2
    assert "cannot parse '80 gigs' as a byte size" in capsys.readouterr().err


def test_plan_memory_not_fitting(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 854,272 B of fp32 weights; 1 MiB x 0.8 leaves 819 KiB: tp=2 halves the weights.
    argv = ["plan", "memory", "--model", str(tiny), "--device-memory", "1MiB"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "fits                 no" in captured.out
    assert "model does not fit: weights take 834.25 KiB per rank" in captured.err
    assert "the smallest tp that fits at pp=1 is tp=2" in captured.err
    assert main([*argv, "--json"]) == 2
    got = json.loads(capsys.readouterr().out)
    assert got["fits"] is False and "tp=2" in got["reason"]


def test_plan_requires_a_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plan"])
    assert exc.value.code == 2
    assert "memory" in capsys.readouterr().err


def test_plan_memory_bad_reserve(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["plan", "memory", "--model", str(tiny), "--device-memory", "1GiB", "--reserve", "1"])
    assert "must be in [0, 1)" in capsys.readouterr().err
