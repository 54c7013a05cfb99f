"""Statistics over seeds x requests: means and paired differences with a crossed bootstrap.

Why: a study repeats every training run over several seeds and evaluates every model on the
same requests. An unsafe rate then varies with the seed (training noise) and with the requests
drawn (sampling noise), and the two are crossed: every seed sees every request. An interval
that resamples only requests (a Wilson interval, McNemar) ignores seed noise, and one over
seed means only ignores request noise. The crossed ("pigeonhole") bootstrap of Owen (2007)
resamples seeds and requests independently, with replacement, and recomputes the grand mean
on the resampled grid; it is conservative (it slightly overstates the variance) and needs no
model of the effects.

A paired comparison (ReGap at λ vs plain) uses the per-cell difference a[s, r] - b[s, r] of
models trained with the same seed and evaluated on the same request, so seed and request
effects shared by both arms cancel. Its two-sided p-value is the percentile-bootstrap one,
2 * min(P*(d <= 0), P*(d >= 0)), floored at 1 / n_boot.

Missing cells (NaN: an item whose generation failed, a diverged run) are left out of each
mean; a seed or request that is missing everywhere is dropped before resampling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from regap.errors import RegapError


@dataclass(frozen=True)
class CrossedEstimate:
    """A grand mean over a seeds x requests table, with its crossed-bootstrap interval."""

    mean: float
    ci: tuple[float, float]
    se: float
    n_seeds: int
    n_requests: int
    n_boot: int
    level: float
    seed_means: tuple[float, ...]
    p_value: float | None = None  # paired differences only: H0 mean difference = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"], out["seed_means"] = list(self.ci), list(self.seed_means)
        out["method"] = "crossed (pigeonhole) bootstrap over seeds and requests (Owen 2007)"
        return out


def _as_table(values: Any, name: str) -> np.ndarray:
    table = np.asarray(values, dtype=float)
    if table.ndim != 2:
        raise RegapError(f"{name}: expected a seeds x requests table, got shape {table.shape}")
    keep_rows = ~np.all(np.isnan(table), axis=1)
    keep_cols = ~np.all(np.isnan(table), axis=0)
    table = table[keep_rows][:, keep_cols]
    if table.size == 0:
        raise RegapError(f"{name}: no values (every cell is missing)")
    return table


def bootstrap_means(table: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Grand means of `n_boot` crossed resamples (seeds and requests drawn independently).

    A resample is a pair of count vectors (how often each seed / request was drawn); its mean
    is sum(w_s w_r x_sr) / sum(w_s w_r [x_sr present]), computed with two matrix products."""
    rng = np.random.default_rng(seed)
    n_seeds, n_requests = table.shape
    present = (~np.isnan(table)).astype(float)
    filled = np.nan_to_num(table, nan=0.0)
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot).astype(float)
    request_counts = rng.multinomial(n_requests, np.full(n_requests, 1.0 / n_requests), size=n_boot).astype(float)
    totals = np.einsum("bs,sr,br->b", seed_counts, filled, request_counts)
    weights = np.einsum("bs,sr,br->b", seed_counts, present, request_counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return totals / weights


def _summary(table: np.ndarray, means: np.ndarray, level: float, n_boot: int) -> tuple[float, tuple[float, float], float]:
    finite = means[np.isfinite(means)]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(np.nanmean(table)), (float(low), float(high)), float(np.std(finite, ddof=1))


def crossed_mean(values: Any, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                 name: str = "table") -> CrossedEstimate:
    """Mean of a seeds x requests table (e.g. 0/1 unsafe verdicts) with a crossed-bootstrap interval."""
    table = _as_table(values, name)
    means = bootstrap_means(table, n_boot, seed)
    mean, ci, se = _summary(table, means, level, n_boot)
    seed_means = tuple(float(v) for v in np.nanmean(table, axis=1))
    return CrossedEstimate(mean, ci, se, table.shape[0], table.shape[1], n_boot, level, seed_means)


def paired_difference(treated: Any, control: Any, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                      name: str = "comparison") -> CrossedEstimate:
    """Mean of treated - control over seeds x requests (cells paired by seed and request), with a
    crossed-bootstrap interval and a two-sided percentile-bootstrap p-value."""
    a, b = np.asarray(treated, dtype=float), np.asarray(control, dtype=float)
    if a.shape != b.shape:
        raise RegapError(f"{name}: the two tables differ in shape ({a.shape} vs {b.shape}); "
                         "pair them by seed and request first")
    table = _as_table(a - b, name)
    means = bootstrap_means(table, n_boot, seed)
    mean, ci, se = _summary(table, means, level, n_boot)
    finite = means[np.isfinite(means)]
    p = 2.0 * min(float(np.mean(finite <= 0.0)), float(np.mean(finite >= 0.0)))
    p = min(1.0, max(p, 1.0 / len(finite)))
    seed_means = tuple(float(v) for v in np.nanmean(table, axis=1))
    return CrossedEstimate(mean, ci, se, table.shape[0], table.shape[1], n_boot, level, seed_means, p)
