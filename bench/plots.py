"""Figures of the goodput benchmark, as PNG files (matplotlib, Agg backend).

Each function takes one series (or one breakdown) per system label, so that the same
figure can put a disaggregated deployment beside its colocated baselines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.metrics import PHASES


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(
    series: Mapping[str, Sequence[Sequence[float]]],
    out: Path,
    target: float,
    xlabel: str,
    title: str,
    log_x: bool = False,
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, points in series.items():
        pts = sorted((float(x), float(y)) for x, y in points)
        ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=label)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"{target:.0%}")
    ax.set(xlabel=xlabel, ylabel="SLO attainment (%)", title=title, ylim=(0, 102))
    if log_x:
        ax.set_xscale("log", base=2)
        xs = sorted({float(x) for points in series.values() for x, _ in points})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_attainment_vs_rate(
    series: Mapping[str, Sequence[Sequence[float]]],
    out: Path,
    target: float = 0.9,
    title: str = "SLO attainment vs request rate",
) -> Path:
    """Attainment (%) against the rate (req/s, or req/s per worker), one line per label
    from its ``(rate, attainment)`` points, with the target as a dashed line."""
    return _curves(series, out, target, "request rate (req/s)", title)


def plot_attainment_vs_scale(
    series: Mapping[str, Sequence[Sequence[float]]],
    out: Path,
    target: float = 0.9,
    title: str = "SLO attainment vs SLO scale",
) -> Path:
    """Attainment (%) against the SLO scale (both SLOs × scale; log₂ axis), one line
    per label from its ``(scale, attainment)`` points."""
    return _curves(series, out, target, "SLO scale (× both SLOs)", title, log_x=True)


def plot_phase_breakdown(
    breakdowns: Mapping[str, Mapping[str, float | None]],
    out: Path,
    title: str = "Mean latency per phase",
) -> Path:
    """Stacked bars of the mean queue, prefill, transfer and decode times (ms), one
    bar per label (missing phases count as 0)."""
    plt = _pyplot()
    labels = list(breakdowns)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels) + 2), 4))
    bottom = [0.0] * len(labels)
    for phase in PHASES:
        heights = [float(breakdowns[label].get(phase) or 0.0) for label in labels]
        ax.bar(labels, heights, bottom=bottom, label=phase.removesuffix("_ms"))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set(ylabel="ms (mean per request)", title=title)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
