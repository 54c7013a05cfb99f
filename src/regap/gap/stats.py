"""Uncertainty for gap statistics: bootstrap over pairs and MIR stability tables.

The resampling unit is the GROUP (an image-text pair), not the token: tokens of one
image are strongly correlated, so resampling tokens would give far too narrow
intervals. Each bootstrap replicate draws pairs with replacement and recomputes the
statistic over the pooled tokens of the drawn pairs, exactly as MIR pools tokens.

Intervals are percentile intervals: simple, invariant to monotone transforms (MIR is
a log10), and they need no jackknife pass, which for MIR would cost one full MIR per
pair on top of the bootstrap (BCa). They can under-cover for very few pairs; the
stability table makes that visible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from regap.errors import RegapError
from regap.gap.mir import Layers, as_layers, mir

DEFAULT_SIZES = (5, 10, 20, 50, 100, 200, 500, 1000)


class BootstrapCI(NamedTuple):
    """Percentile interval and the bootstrap replicates (float64, length n_boot)."""

    low: float
    high: float
    samples: Tensor


def bootstrap_over_groups(
    groups: Sequence[Any],
    statistic: Callable[[list[Any]], float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap CI of ``statistic`` over groups resampled with replacement.

    ``statistic`` receives a list of ``len(groups)`` group items (duplicates allowed)
    and returns a float. Deterministic for a fixed ``seed`` (own torch.Generator).
    """
    if len(groups) == 0:
        raise RegapError("bootstrap needs at least one group, got none")
    if n_boot < 1:
        raise RegapError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise RegapError(f"level must be in (0, 1), got {level}")
    gen = torch.Generator().manual_seed(seed)
    n = len(groups)
    samples = torch.empty(n_boot, dtype=torch.float64)
    for b in range(n_boot):
        idx = torch.randint(n, (n,), generator=gen).tolist()
        samples[b] = float(statistic([groups[i] for i in idx]))
    if not bool(torch.isfinite(samples).all()):
        raise RegapError("bootstrap statistic returned NaN or inf for some resamples")
    tail = (1.0 - level) / 2.0
    qs = torch.quantile(samples, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return BootstrapCI(low=float(qs[0]), high=float(qs[1]), samples=samples)


@dataclass(frozen=True)
class PairTokens:
    """One image-text pair: per-layer image tokens and per-layer text tokens."""

    image: list[Tensor]  # L tensors [Nv, d]
    text: list[Tensor]  # L tensors [Nt, d]


def as_pairs(pairs: Sequence[tuple[Layers, Layers] | PairTokens]) -> list[PairTokens]:
    """Normalise ``(image [L, Nv, d] | list, text [L, Nt, d] | list)`` tuples to PairTokens."""
    out = []
    for k, p in enumerate(pairs):
        if not isinstance(p, PairTokens):
            img, txt = p
            p = PairTokens(as_layers(img, f"pair {k} image"), as_layers(txt, f"pair {k} text"))
        out.append(p)
    if not out:
        raise RegapError("no image-text pairs given")
    n_layers = len(out[0].image)
    for k, p in enumerate(out):
        if len(p.image) != n_layers or len(p.text) != n_layers:
            raise RegapError(
                f"pair {k} has {len(p.image)} image / {len(p.text)} text layers;"
                f" expected {n_layers} in both, like pair 0"
            )
    return out


def pool_pairs(pairs: Sequence[PairTokens]) -> tuple[list[Tensor], list[Tensor]]:
    """Concatenate the tokens of several pairs layer by layer."""
    n_layers = len(pairs[0].image)
    image = [torch.cat([p.image[k] for p in pairs], dim=0) for k in range(n_layers)]
    text = [torch.cat([p.text[k] for p in pairs], dim=0) for k in range(n_layers)]
    return image, text


def mir_of_pairs(pairs: Sequence[PairTokens], **mir_kwargs: Any) -> float:
    """MIR over the pooled tokens of ``pairs`` (keyword args go to :func:`mir`)."""
    image, text = pool_pairs(pairs)
    return mir(image, text, **mir_kwargs).mir


class MIRInterval(NamedTuple):
    mir: float
    low: float
    high: float
    samples: Tensor


def bootstrap_mir(
    pairs: Sequence[tuple[Layers, Layers] | PairTokens],
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    **mir_kwargs: Any,
) -> MIRInterval:
    """Point MIR over all pairs plus a pair-bootstrap percentile interval.

    Each replicate costs one full MIR (L eigendecompositions per FD); size ``n_boot``
    to the hardware.
    """
    items = as_pairs(pairs)
    ci = bootstrap_over_groups(
        items, lambda sel: mir_of_pairs(sel, **mir_kwargs), n_boot=n_boot, level=level, seed=seed
    )
    return MIRInterval(mir_of_pairs(items, **mir_kwargs), ci.low, ci.high, ci.samples)


@dataclass(frozen=True)
class StabilityRow:
    n_groups: int
    estimate: float
    low: float
    high: float


def stability_table(
    groups: Sequence[Any],
    statistic: Callable[[list[Any]], float],
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> list[StabilityRow]:
    """Estimate and bootstrap CI on nested random subsets of growing size.

    Subsets are prefixes of one seeded permutation (so each contains the previous
    one); sizes above the available count are dropped and the full count is always
    the last row, showing how many pairs a stable value needs.
    """
    n = len(groups)
    if n == 0:
        raise RegapError("stability table needs at least one group, got none")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    counts = sorted({s for s in sizes if 0 < s < n} | {n})
    rows = []
    for m in counts:
        subset = [groups[i] for i in order[:m]]
        ci = bootstrap_over_groups(subset, statistic, n_boot=n_boot, level=level, seed=seed)
        rows.append(StabilityRow(m, float(statistic(subset)), ci.low, ci.high))
    return rows


def mir_stability_table(
    pairs: Sequence[tuple[Layers, Layers] | PairTokens],
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    **mir_kwargs: Any,
) -> list[StabilityRow]:
    """:func:`stability_table` with MIR over pooled pairs as the statistic."""
    return stability_table(
        as_pairs(pairs),
        lambda sel: mir_of_pairs(sel, **mir_kwargs),
        sizes=sizes,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )
