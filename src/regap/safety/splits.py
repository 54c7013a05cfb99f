"""Seeded, grouped splits of labelled data into a fitting side and a held-out side.

Why its own module: the relevance calibration (`regap.safety.judges.relevance_threshold`) and the judge
validation (`regap.safety.judges.validation`, whose `--split` scores the refusal-lexicon judge's
held-out side) must draw the same kind of split, and each already imports from the other's
neighbours; a shared leaf keeps the imports one way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from regap.errors import RegapError


def split_groups(groups: Sequence[str], calibration_fraction: float, seed: int) -> np.ndarray:
    """True for rows in the calibration split, False for held-out rows.

    Groups (not rows) are shuffled with `seed` after sorting, so the split depends only
    on the set of groups and the seed, not on row order; rows of one group stay together.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise RegapError(f"calibration fraction must lie strictly between 0 and 1, got {calibration_fraction!r}")
    keys = np.asarray([str(g) for g in groups], dtype=object)
    unique = sorted(set(keys.tolist()))
    if len(unique) < 2:
        raise RegapError(f"need at least 2 groups to split, got {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_cal = min(len(unique) - 1, max(1, round(calibration_fraction * len(unique))))
    chosen = {unique[i] for i in order[:n_cal]}
    return np.asarray([k in chosen for k in keys], dtype=bool)


__all__ = ["split_groups"]
