"""Measuring one loaded model on a list of pairs: collect, analyse, clean up."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from regap.gap.collect import collect_hidden_states
from regap.gap.measure import analyse, stability
from regap.gap.pairs import GapPair

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM


def measure_gap(
    model: LVLM, pairs: list[GapPair], spill_dir: str | Path, *, protocol: str = "reference",
    text_tokens: str = "after-image", batch_size: int = 8, mode: str = "exact", n_boot: int = 1000,
    seed: int = 0, with_stability: bool = False, keep_hidden: bool = False, progress: bool = True,
    ci: str = "linear", analysis_device: str | None = None, intervention: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """The gap record (MIR, interval, layer-0 gap, per-layer curves) of `model` on `pairs`,
    measured under a defense's hidden-state `intervention` when one is given.

    ``analysis_device`` is where the per-layer fits run (`analyse`'s ``device``; CPU by default)."""
    store = collect_hidden_states(model, pairs, spill_dir, protocol=protocol, text_tokens=text_tokens,
                                  batch_size=batch_size, progress=progress, intervention=intervention)
    try:
        result = analyse(store, mode=mode, n_boot=n_boot, seed=seed, ci=ci, device=analysis_device)
        if with_stability:
            result["stability"] = stability(store, mode=mode, n_boot=n_boot, seed=seed, ci=ci,
                                            device=analysis_device)
    finally:
        if not keep_hidden:
            store.remove()
    return result
