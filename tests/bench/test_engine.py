"""The engine benchmark's aggregation of repeated runs."""

from __future__ import annotations

from bench.engine import median_run


def test_median_run_takes_each_figure_apart() -> None:
    runs = [
        {"decode_tok_s_b1": 90.0, "floor_step_ms": 4.0, "params": 10, "dtype": "float32"},
        {"decode_tok_s_b1": 70.0, "floor_step_ms": 3.0, "params": 10, "dtype": "float32"},
        {"decode_tok_s_b1": 110.0, "floor_step_ms": 5.5, "params": 10, "dtype": "float32"},
    ]
    med = median_run(runs)
    assert med == {
        "decode_tok_s_b1": 90.0, "floor_step_ms": 4.0, "params": 10, "dtype": "float32",
        "runs": 3,
    }  # fmt: skip
    assert median_run(runs[:1]) == runs[0]  # one run: as it came, no "runs" field
