"""Agreement between judges on the same items: pairwise Cohen's kappa.

Why: safety numbers move with the judge, so a report that uses several judges should
say how far they agree. For each pair of judges, kappa is computed on the items both
judged (an `error` verdict, or one whose field is None, drops the item from the pairs
that judge is in, and is counted), with `regap.safety.metrics.cohen_kappa` (NaN when
undefined: no shared items, or both judges gave one and the same answer throughout).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import pandas as pd

from regap.errors import RegapError
from regap.safety.judges.base import Verdict
from regap.safety.metrics import cohen_kappa

FIELDS = ("unsafe", "refused", "label")


def _values(verdicts: Sequence[Verdict], field: str) -> list[Any]:
    out = []
    for v in verdicts:
        value = None if v.is_error else getattr(v, field)
        out.append(value)
    return out


def _check(verdicts_by_judge: Mapping[str, Sequence[Verdict]], field: str) -> dict[str, list[Any]]:
    if field not in FIELDS:
        raise RegapError(f"agreement: field must be one of {', '.join(FIELDS)}, got {field!r}")
    if not verdicts_by_judge:
        raise RegapError("agreement: no judges given")
    lengths = {name: len(v) for name, v in verdicts_by_judge.items()}
    if len(set(lengths.values())) > 1:
        raise RegapError(f"agreement: judges must rate the same items in the same order; counts differ: {lengths}")
    return {name: _values(list(v), field) for name, v in verdicts_by_judge.items()}


def pairwise_agreement(verdicts_by_judge: Mapping[str, Sequence[Verdict]], field: str = "unsafe") -> pd.DataFrame:
    """One row per pair of judges (and each judge with itself): `judge_a, judge_b, n,
    n_skipped, agreement, kappa`. `n` counts the items both judged; `agreement` is the
    raw share of equal answers among them (NaN with n = 0)."""
    values = _check(verdicts_by_judge, field)
    names = list(values)
    rows = []
    for i, a in enumerate(names):
        for b in names[i:]:
            pairs = [(x, y) for x, y in zip(values[a], values[b]) if x is not None and y is not None]
            n = len(pairs)
            rows.append({
                "judge_a": a,
                "judge_b": b,
                "n": n,
                "n_skipped": len(values[a]) - n,
                "agreement": sum(x == y for x, y in pairs) / n if n else math.nan,
                "kappa": cohen_kappa([x for x, _ in pairs], [y for _, y in pairs]) if n else math.nan,
            })
    return pd.DataFrame(rows, columns=["judge_a", "judge_b", "n", "n_skipped", "agreement", "kappa"])


def kappa_matrix(verdicts_by_judge: Mapping[str, Sequence[Verdict]], field: str = "unsafe") -> pd.DataFrame:
    """Symmetric judges x judges matrix of Cohen's kappa on `field` (default `unsafe`)."""
    table = pairwise_agreement(verdicts_by_judge, field)
    names = list(verdicts_by_judge)
    matrix = pd.DataFrame(math.nan, index=names, columns=names, dtype=float)
    for row in table.itertuples(index=False):
        matrix.loc[row.judge_a, row.judge_b] = row.kappa
        matrix.loc[row.judge_b, row.judge_a] = row.kappa
    return matrix


__all__ = ["FIELDS", "pairwise_agreement", "kappa_matrix"]
