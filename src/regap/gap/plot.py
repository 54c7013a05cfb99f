"""Per-layer gap curves (one figure, one line per model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_layers(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Fréchet distance and centroid gap per layer; layer 0 (LLM input) marked, as MIR skips it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, result in results.items():
        layers = [row["layer"] for row in result["per_layer"]]
        mir = result.get("mir")
        name = f"{label} (MIR {mir:.3f})" if mir is not None else label
        axes[0].plot(layers, [row["frechet"] for row in result["per_layer"]], marker="o", markersize=3, label=name)
        axes[1].plot(layers, [row["centroid_gap"] for row in result["per_layer"]], marker="o", markersize=3, label=name)
    for axis, title in zip(axes, ("Fréchet distance (text-centric scaled)", "centroid gap (text-centric scaled)")):
        axis.set_yscale("log")
        axis.set_xlabel("layer (0 = LLM input embeddings)")
        axis.set_title(title)
        axis.axvline(0.5, color="gray", linestyle=":", linewidth=1)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
