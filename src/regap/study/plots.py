"""Figures the demo adds to its report: training curves and unsafe rates per condition."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(metrics: dict[str, Path], path: Path) -> Path:
    """Captioning loss and the probe's layer-0 gap against the step, one line per run."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, file in metrics.items():
        if not file.exists():
            continue
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        loss = [(r["step"], r.get("caption_loss", r.get("loss"))) for r in rows if r.get("caption_loss", r.get("loss")) is not None]
        gap = [(r["step"], r["probe_gap0"]) for r in rows if r.get("probe_gap0") is not None]
        if loss:
            axes[0].plot(*zip(*loss), label=label)
        if gap:
            axes[1].plot(*zip(*gap), marker="o", markersize=3, label=label)
    axes[0].set_title("captioning loss")
    axes[1].set_title("layer-0 gap on the probe set")
    axes[1].set_yscale("log")
    for axis in axes:
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_safety_conditions(summaries: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Unsafe rate per condition (first judge), one bar per model, 95 % Wilson intervals."""
    import numpy as np

    if not summaries:
        return None
    plt = _pyplot()
    first = next(iter(summaries.values()))
    judge = next(iter(first["judges"]))
    conditions = [r["condition"] for r in first["judges"][judge].get("by_condition", [])]
    width = 0.8 / len(summaries)
    figure, axis = plt.subplots(figsize=(1.8 * len(conditions) + 2, 4.2), constrained_layout=True)
    for index, (label, summary) in enumerate(summaries.items()):
        rows = {r["condition"]: r["unsafe"] for r in summary["judges"][judge].get("by_condition", [])}
        rates = np.array([rows[c]["rate"] if c in rows else np.nan for c in conditions], dtype=float)
        low = np.array([rows[c]["ci"][0] if c in rows else np.nan for c in conditions], dtype=float)
        high = np.array([rows[c]["ci"][1] if c in rows else np.nan for c in conditions], dtype=float)
        x = np.arange(len(conditions)) + index * width
        axis.bar(x, rates, width, yerr=[rates - low, high - rates], capsize=3, label=label)
    axis.set_xticks(np.arange(len(conditions)) + width * (len(summaries) - 1) / 2, conditions)
    axis.set_ylim(0, 1)
    axis.set_ylabel(f"unsafe rate ({judge} judge, 95% CI)")
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
