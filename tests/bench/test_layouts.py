"""Smoke test of the layout benchmark: the TP=1 layout on the tiny preset (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.layouts import main


@pytest.mark.slow
def test_layouts_tp1_tiny_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the checkpoint is made under ./models
    argv = ["--preset", "tiny", "--layouts", "TP=1", "--steps", "2", "--warmup", "1"]
    argv += ["--prefill-reps", "1", "--prompt-len", "32", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    (row,) = json.loads((tmp_path / "out" / "layouts-llama-tiny.json").read_text())["rows"]
    assert row["available"] and row["layout"] == "TP=1"
    assert row["decode_step_s"] > 0 and row["prefill_s"] > 0
    assert row["collectives_per_decode_step"]["total_num_all_reduces"] == 0
    assert (tmp_path / "out" / "layouts-llama-tiny.png").is_file()
