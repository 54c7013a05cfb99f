"""A small synthetic `HiddenStates` spill for the gap-analysis tests (no model)."""

from __future__ import annotations

import torch


def synthetic_store(tmp_path, pairs: int = 24, per_pair: int = 6, d: int = 4, layers: int = 3, seed: int = 13):
    """Image tokens = Gaussian @ a random mix + 1, text tokens = Gaussian * 0.5 (float64), `per_pair`
    tokens of each modality per pair: two clouds with a known gap and full-rank covariances."""
    from regap.gap.collect import HiddenStates

    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    image = torch.randn(layers, pairs * per_pair, d, generator=gen, dtype=torch.float64) @ mix + 1.0
    text = torch.randn(layers, pairs * per_pair, d, generator=gen, dtype=torch.float64) * 0.5
    index = torch.arange(pairs).repeat_interleave(per_pair)
    return HiddenStates.from_tensors(tmp_path / "hidden", image, text, index, index)
