"""``pdserve generate --disaggregated`` prints the single-instance output, plus the
transfer's bytes and seconds with --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.cli import main


def test_generate_disaggregated_prints_the_same(
    tiny_llama: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(tiny_llama), "--prompt", "Hello there, how are you"]
    argv += ["--max-tokens", "8", "--dtype", "float32", "--threads", "1", "--json"]
    argv += ["--kv-cache-bytes", str(1 << 20)]  # a small pool: allocating GBs takes seconds
    assert main(argv) == 0
    single = json.loads(capsys.readouterr().out)
    disagg = ["--disaggregated", "--prefill-tp", "2", "--decode-pp", "2", "--transport", "grpc"]
    assert main([*argv, *disagg]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("token_ids", "text", "finish_reason"):
        assert out[key] == single[key]
    transfer = out["transfer"]
    assert transfer["ok"] and transfer["transport"] == "grpc"
    # tiny llama: 4 layers x 2 KV heads x 16 dims x K,V x fp32 = 1 KiB per token.
    prompt_blocks = transfer["num_blocks"]
    assert transfer["num_bytes"] == prompt_blocks * 16 * 1024
    assert transfer["seconds"] > 0
    assert out["timings"]["first_token"] <= out["timings"]["transfer_end"]


def test_generate_disaggregated_text_mode(
    tiny_llama: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(tiny_llama), "--prompt-token-ids", "5,6,7"]
    argv += ["--max-tokens", "4", "--dtype", "float32", "--kv-cache-bytes", str(1 << 20)]
    assert main(argv) == 0
    single = capsys.readouterr().out
    assert main([*argv, "--disaggregated", "--transport", "local"]) == 0
    assert capsys.readouterr().out == single
