"""Projectors that map vision features into the LLM's embedding space (LLaVA's types)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from regap.errors import RegapError

_MLP = re.compile(r"^mlp(\d+)x_gelu$")
PROJECTOR_TYPES = ("linear", "mlp{N}x_gelu (e.g. mlp2x_gelu)", "qformer")


def build_projector(kind: str, vision_dim: int, llm_dim: int, seed: int = 0, **options: Any) -> nn.Module:
    """`linear` = one Linear; `mlpNx_gelu` = Linear, then (GELU, Linear) N-1 times, as in LLaVA;
    `qformer` = a BLIP-2 style Q-Former connector (`regap.models.qformer`; `options` size it).

    The MLP types are always an `nn.Sequential`, so state-dict keys are `0.weight`, `2.weight`, ... and a
    LLaVA `mlp2x_gelu` maps one-to-one onto Hugging Face's `linear_1`/`linear_2`.
    The fresh initialisation is seeded, so an untrained preset gives the same answers everywhere.
    """
    if kind == "qformer":
        from regap.models.qformer import build_qformer_projector

        return build_qformer_projector(vision_dim, llm_dim, seed=seed, **options)
    if options:
        raise RegapError(f"projector type {kind!r} takes no options (got {', '.join(sorted(options))})")
    match = _MLP.match(kind)
    if kind == "linear" or (match and int(match.group(1)) >= 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
            for _ in range(int(match.group(1)) - 1 if match else 0):
                layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        return nn.Sequential(*layers)
    raise RegapError(f"unknown projector type {kind!r}; valid: {', '.join(PROJECTOR_TYPES)}")
