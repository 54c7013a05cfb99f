"""Gap vs safety across models or checkpoints: Pearson and Spearman with bootstrap intervals.

Each run folder contributes one point: its MIR (from `gap.json`) and its unsafe rate (from a
`regap safety` `summary.json`), found in the folder itself or in `gap/` and `safety/` below it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from regap.errors import RegapError


@dataclass
class Point:
    run: str
    label: str
    mir: float
    layer0_gap: float
    unsafe_rate: float
    n_items: int


def _find(folder: Path, name: str, sub: str) -> Path:
    for candidate in (folder / name, folder / sub / name):
        if candidate.exists():
            return candidate
    raise RegapError(f"{folder}: no {name} (looked in {folder} and {folder / sub})")


def unsafe_rate(summary: dict[str, Any], judge: str | None, conditions: list[str] | None) -> tuple[float, int]:
    """Pooled unsafe rate over the chosen conditions (default: every condition with an image)."""
    judges = summary.get("judges", {})
    if not judges:
        raise RegapError("summary.json has no judges")
    judge = judge or next(iter(judges))
    if judge not in judges:
        raise RegapError(f"judge {judge!r} not in summary (has {', '.join(judges)})")
    rows = judges[judge].get("by_condition", [])
    chosen = [r for r in rows if (r["condition"] in conditions if conditions else r["condition"] not in ("text", "backbone"))]
    if not chosen:
        raise RegapError(f"no conditions {conditions or 'with images'} in summary for judge {judge}")
    k = sum(r["unsafe"]["k"] for r in chosen)
    n = sum(r["unsafe"]["n"] for r in chosen)
    return (k / n if n else math.nan), n


def gather(folders: list[Path], judge: str | None = None, conditions: list[str] | None = None) -> list[Point]:
    points = []
    for folder in folders:
        gap = json.loads(_find(folder, "gap.json", "gap").read_text())
        summary = json.loads(_find(folder, "summary.json", "safety").read_text())
        rate, n = unsafe_rate(summary, judge, conditions)
        label_file = folder / "label.txt"
        label = label_file.read_text().strip() if label_file.exists() else folder.name
        if gap.get("mir") is None:
            raise RegapError(f"{folder}: gap.json has no MIR value")
        points.append(Point(str(folder), label, float(gap["mir"]), float(gap["layer0_gap"]), rate, n))
    return points


def _bootstrap_ci(x: np.ndarray, y: np.ndarray, statistic, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        index = rng.integers(0, len(x), len(x))
        if np.ptp(x[index]) == 0 or np.ptp(y[index]) == 0:
            continue  # correlation undefined for a constant resample
        values.append(statistic(x[index], y[index]))
    if not values:
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def correlate(points: list[Point], x: str = "mir", n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Pearson and Spearman correlation of `x` (mir or layer0_gap) with the unsafe rate."""
    if len(points) < 3:
        raise RegapError(f"need at least 3 runs to correlate, got {len(points)}")
    xs = np.array([getattr(p, x) for p in points], dtype=float)
    ys = np.array([p.unsafe_rate for p in points], dtype=float)
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        raise RegapError(f"{x} or the unsafe rate is constant across runs: correlation undefined")
    pearson = stats.pearsonr(xs, ys)
    spearman = stats.spearmanr(xs, ys)
    slope, intercept = np.polyfit(xs, ys, 1)
    return {
        "x": x, "n_points": len(points), "points": [asdict(p) for p in points],
        "pearson": {"r": float(pearson.statistic), "p_value": float(pearson.pvalue),
                    "ci": _bootstrap_ci(xs, ys, lambda a, b: stats.pearsonr(a, b).statistic, n_boot, seed, level)},
        "spearman": {"rho": float(spearman.statistic), "p_value": float(spearman.pvalue),
                     "ci": _bootstrap_ci(xs, ys, lambda a, b: stats.spearmanr(a, b).statistic, n_boot, seed, level)},
        "fit": {"slope": float(slope), "intercept": float(intercept)},
        "ci_method": f"bootstrap over runs (n_boot={n_boot}, seed={seed}, percentile, level={level})",
    }


def correlate_or_undefined(points: list[Point], x: str = "mir", n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """`correlate`, or, when the correlation is undefined (fewer than 3 runs, or a constant gap or
    unsafe rate, as in small runs where every checkpoint answers alike), the points with the reason
    under `undefined`, so a study still completes and says why there is no coefficient."""
    try:
        return correlate(points, x=x, n_boot=n_boot, seed=seed)
    except RegapError as exc:
        return {"x": x, "n_points": len(points), "points": [asdict(p) for p in points], "undefined": str(exc)}


def plot_correlation(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.array([p[result["x"]] for p in result["points"]])
    ys = np.array([p["unsafe_rate"] for p in result["points"]])
    figure, axis = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    axis.scatter(xs, ys, zorder=3)
    for point in result["points"]:
        axis.annotate(point["label"], (point[result["x"]], point["unsafe_rate"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    if "fit" in result:
        grid = np.linspace(xs.min(), xs.max(), 50)
        axis.plot(grid, result["fit"]["slope"] * grid + result["fit"]["intercept"], color="C1", label="least-squares fit")
        pearson, spearman = result["pearson"], result["spearman"]
        axis.set_title(f"Pearson r = {pearson['r']:.2f} [{pearson['ci'][0]:.2f}, {pearson['ci'][1]:.2f}], "
                       f"Spearman ρ = {spearman['rho']:.2f}", fontsize=9)
        axis.legend(fontsize=8)
    else:  # an `undefined` result (see `correlate_or_undefined`): the points alone
        axis.set_title(result.get("undefined", "correlation undefined"), fontsize=9)
    axis.set_xlabel("MIR (lower = smaller modality gap)" if result["x"] == "mir" else "layer-0 gap")
    axis.set_ylabel("unsafe rate")
    axis.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
