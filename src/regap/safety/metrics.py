"""Statistics for safety metrics: rates with Wilson intervals, paired comparisons of
two conditions on the same requests, and agreement between a judge and humans.

Conventions:

* Proportions get Wilson score intervals (good coverage near 0 and 1, where refusal
  and attack-success rates often sit). With n = 0 the interval is (0, 1): no data,
  no information, and no NaN to leak into tables.
* Two conditions run on the same requests are *paired*: compare them with McNemar's
  exact test (`mcnemar_exact`) and Newcombe's hybrid score interval for the
  difference of paired proportions (`paired_difference`), not with tests for
  independent samples, which ignore the pairing and are too conservative.
* Agreement metrics return NaN where they are undefined (precision with no predicted
  positives, kappa when both raters use a single identical label); callers turn NaN
  into `null` when writing JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest, norm

from regap.errors import RegapError


def _z(level: float) -> float:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level!r}")
    return float(norm.ppf(0.5 + float(level) / 2.0))


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n trials (no continuity correction).

    Returns (low, high) within [0, 1]. With n = 0 it returns (0.0, 1.0).
    """
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = _z(level)
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def _outcome_values(series: pd.Series, column: str) -> pd.Series:
    """Map an outcome column to 1.0 / 0.0 / NaN (missing: errors, unjudged)."""

    def convert(value: Any) -> float:
        if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
            return math.nan
        if isinstance(value, (bool, np.bool_)):
            return float(value)
        if isinstance(value, (int, float, np.integer, np.floating)) and float(value) in (0.0, 1.0):
            return float(value)
        raise RegapError(f"outcome column {column!r} holds {value!r}; expected True/False/1/0 or missing")

    return series.map(convert).astype(float)


def rate_table(
    rows: pd.DataFrame | Iterable[dict[str, Any]],
    by: Sequence[str] | str = (),
    outcome: str = "unsafe",
    level: float = 0.95,
) -> pd.DataFrame:
    """Per-group counts, rates and Wilson intervals of a binary outcome.

    `rows` is a DataFrame or an iterable of dicts, one per judged response; `outcome`
    names a column of True/False (1/0) values where missing values (None/NaN, e.g. an
    `error` verdict) are left out of n and counted in `n_missing`. Returns one row per
    group (in sorted order) with columns `*by, n, k, rate, ci_low, ci_high, n_missing`;
    `rate` is NaN for a group with n = 0. With `by` empty, one overall row.
    """
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, outcome] if c not in frame.columns]
    if missing:
        raise RegapError(
            f"rate_table: no column {', '.join(map(repr, missing))}; columns: {', '.join(map(str, frame.columns))}"
        )
    values = _outcome_values(frame[outcome], outcome) if len(frame) else pd.Series([], dtype=float)
    work = frame[by].copy()
    work["_value"] = values.to_numpy()

    def summarise(values: pd.Series) -> dict[str, Any]:
        present = values.dropna()
        n, k = int(len(present)), int(present.sum())
        low, high = wilson_interval(k, n, level)
        return {
            "n": n,
            "k": k,
            "rate": k / n if n else math.nan,
            "ci_low": low,
            "ci_high": high,
            "n_missing": int(values.isna().sum()),
        }

    columns = [*by, "n", "k", "rate", "ci_low", "ci_high", "n_missing"]
    if not by:
        return pd.DataFrame([summarise(work["_value"])], columns=columns)
    records = []
    for key, group in work.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        records.append({**dict(zip(by, key)), **summarise(group["_value"])})
    return pd.DataFrame(records, columns=columns)


def _paired_bools(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, values in (("a", a), ("b", b)):
        array = np.asarray(values)
        if array.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
        if array.dtype != bool:
            if array.dtype.kind not in "iuf" or not np.isin(array, (0, 1)).all():
                raise ValueError(f"{name} must hold booleans or 0/1 (drop missing outcomes first)")
            array = array.astype(bool)
        arrays.append(array)
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"paired outcomes differ in length: {arrays[0].size} vs {arrays[1].size}")
    return arrays[0], arrays[1]


class McNemarResult(NamedTuple):
    #: pairs with a False and b True
    b01: int
    #: pairs with a True and b False
    b10: int
    #: two-sided exact p-value (binomial test of b01 vs b10 at 1/2); 1.0 with no discordant pairs
    p_value: float


def mcnemar_exact(a: Any, b: Any) -> McNemarResult:
    """Exact McNemar test for paired binary outcomes (e.g. unsafe under condition a and b
    for the same requests): a two-sided binomial test on the discordant pairs."""
    a, b = _paired_bools(a, b)
    b01 = int(np.sum(~a & b))
    b10 = int(np.sum(a & ~b))
    discordant = b01 + b10
    p_value = 1.0 if discordant == 0 else float(binomtest(b01, discordant, 0.5, alternative="two-sided").pvalue)
    return McNemarResult(b01, b10, min(1.0, p_value))


@dataclass(frozen=True)
class PairedDifference:
    """rate(a) - rate(b) on paired data, with its confidence interval."""

    difference: float
    ci_low: float
    ci_high: float
    rate_a: float
    rate_b: float
    n: int
    b01: int
    b10: int
    level: float
    method: str = "newcombe-hybrid-score (Newcombe 1998, method 10)"


def paired_difference(a: Any, b: Any, level: float = 0.95) -> PairedDifference:
    """Difference of two paired proportions, mean(a) - mean(b), with Newcombe's hybrid
    score interval (method 10 of Newcombe 1998, Stat Med 17:2635), which combines the
    Wilson intervals of both rates with the phi correlation of the pairs (phi
    corrected towards 0 by n/2 in its numerator when positive). Unlike the Wald
    interval it stays inside [-1, 1] and does not collapse to zero width when there are
    no discordant pairs. With n = 0: difference 0 and interval (-1, 1).
    """
    a, b = _paired_bools(a, b)
    _z(level)
    n = int(a.size)
    both = int(np.sum(a & b))
    b10 = int(np.sum(a & ~b))
    b01 = int(np.sum(~a & b))
    neither = n - both - b10 - b01
    if n == 0:
        return PairedDifference(0.0, -1.0, 1.0, math.nan, math.nan, 0, 0, 0, level)
    p1 = (both + b10) / n
    p2 = (both + b01) / n
    diff = p1 - p2
    l1, u1 = wilson_interval(both + b10, n, level)
    l2, u2 = wilson_interval(both + b01, n, level)
    marginals = float(both + b10) * float(b01 + neither) * float(both + b01) * float(b10 + neither)
    phi = 0.0
    if marginals > 0:
        cross = float(both) * neither - float(b10) * b01
        if cross > n / 2:
            numerator = cross - n / 2
        elif cross < 0:
            numerator = cross
        else:
            numerator = 0.0
        phi = numerator / math.sqrt(marginals)
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return PairedDifference(diff, max(-1.0, low), min(1.0, high), p1, p2, n, b01, b10, level)


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's kappa between two raters' labels (any hashable labels).

    kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement and p_e the
    agreement expected from each rater's label frequencies. NaN when n = 0 or when
    p_e = 1 (both raters used one and the same label throughout).
    """
    labels_a, labels_b = list(labels_a), list(labels_b)
    if len(labels_a) != len(labels_b):
        raise ValueError(f"label lists differ in length: {len(labels_a)} vs {len(labels_b)}")
    n = len(labels_a)
    if n == 0:
        return math.nan
    observed = sum(x == y for x, y in zip(labels_a, labels_b)) / n
    counts_a = pd.Series(labels_a).value_counts()
    counts_b = pd.Series(labels_b).value_counts()
    expected = float(sum(counts_a[c] * counts_b.get(c, 0) for c in counts_a.index)) / (n * n)
    if math.isclose(expected, 1.0):
        return math.nan
    return (observed - expected) / (1.0 - expected)


def confusion_counts(truth: Any, predicted: Any) -> dict[str, int]:
    """tp, fp, fn, tn of binary predictions against binary truth (True = positive)."""
    t, p = _paired_bools(truth, predicted)
    return {
        "tp": int(np.sum(t & p)),
        "fp": int(np.sum(~t & p)),
        "fn": int(np.sum(t & ~p)),
        "tn": int(np.sum(~t & ~p)),
    }


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def accuracy(truth: Any, predicted: Any) -> float:
    c = confusion_counts(truth, predicted)
    return _ratio(c["tp"] + c["tn"], sum(c.values()))


def precision(truth: Any, predicted: Any) -> float:
    """tp / (tp + fp); NaN with no predicted positives."""
    c = confusion_counts(truth, predicted)
    return _ratio(c["tp"], c["tp"] + c["fp"])


def recall(truth: Any, predicted: Any) -> float:
    """tp / (tp + fn); NaN with no true positives."""
    c = confusion_counts(truth, predicted)
    return _ratio(c["tp"], c["tp"] + c["fn"])


def f1_score(truth: Any, predicted: Any) -> float:
    """2 tp / (2 tp + fp + fn); NaN when there are neither true nor predicted positives."""
    c = confusion_counts(truth, predicted)
    return _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])


def binary_metrics(truth: Any, predicted: Any, level: float = 0.95) -> dict[str, Any]:
    """Confusion counts, accuracy (with its Wilson interval), precision, recall, F1,
    Cohen's kappa and the positive rates of truth and prediction."""
    t, p = _paired_bools(truth, predicted)
    c = confusion_counts(t, p)
    n = int(t.size)
    correct = c["tp"] + c["tn"]
    return {
        "n": n,
        **c,
        "accuracy": _ratio(correct, n),
        "accuracy_ci": list(wilson_interval(correct, n, level)),
        "precision": _ratio(c["tp"], c["tp"] + c["fp"]),
        "recall": _ratio(c["tp"], c["tp"] + c["fn"]),
        "f1": _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
        "kappa": cohen_kappa(t.tolist(), p.tolist()),
        "truth_rate": _ratio(int(t.sum()), n),
        "predicted_rate": _ratio(int(p.sum()), n),
    }


__all__ = [
    "wilson_interval",
    "rate_table",
    "McNemarResult",
    "mcnemar_exact",
    "PairedDifference",
    "paired_difference",
    "cohen_kappa",
    "confusion_counts",
    "accuracy",
    "precision",
    "recall",
    "f1_score",
    "binary_metrics",
]
