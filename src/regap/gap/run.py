"""Measuring one loaded model on a list of pairs: collect, analyse, clean up; and the gap record
with its provenance, which `regap gap` and the demo both write through `measure_to_folder`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from regap.gap.collect import collect_hidden_states
from regap.gap.measure import analyse, stability
from regap.models.gap_pair import GapPair

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


def measure_to_folder(
    model: LVLM, pairs: list[GapPair], folder: str | Path, *, model_name: str, projector: str | Path | None = None,
    protocol: str = "reference", images: str | None = None, texts: str | None = None, texts_per_pair: int = 1,
    text_tokens: str = "after-image", batch_size: int = 8, mode: str = "exact", n_boot: int = 1000, seed: int = 0,
    ci: str = "linear", with_stability: bool = False, keep_hidden: bool = False, progress: bool = True,
    dtype_requested: str | None = None, defenses: list[str] | None = None, tag: str = "a",
    extra_provenance: dict[str, Any] | None = None, write: bool = True,
) -> dict[str, Any]:
    """The gap record of `model` on `pairs` with its provenance (one set of keys for every caller),
    written to `folder/gap.json` when `write` (hidden states spill to `folder/.hidden-TAG`).

    `defenses` (specs of hidden-state defenses, e.g. ``cmrm``) are active while the hidden states
    are collected; calibration files made on first use go to `folder/defenses/`."""
    from regap.files import write_json_atomic
    from regap.models.attention import llm_attention
    from regap.models.fingerprint import model_fingerprint
    from regap.provenance import provenance

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    intervention, described = None, []
    if defenses:
        from regap.defenses import get_defense
        from regap.defenses.base import hidden_state_intervention

        from regap.safety.pairs import make_pairs

        built = [get_defense(spec) for spec in defenses]
        intervention = hidden_state_intervention(built, model, workdir=folder, make_pairs=make_pairs)
        described = [{**d.describe(), "calibration_sha256": getattr(getattr(d, "calibration", None), "sha256", None)}
                     for d in built]
    result = measure_gap(model, pairs, folder / f".hidden-{tag}", protocol=protocol, text_tokens=text_tokens,
                         batch_size=batch_size, mode=mode, n_boot=n_boot, seed=seed, ci=ci,
                         with_stability=with_stability, keep_hidden=keep_hidden, progress=progress,
                         intervention=intervention)
    result["defenses"] = described
    result["provenance"] = provenance(
        model=model_name, model_config=model.config.to_dict(), model_fingerprint=model_fingerprint(model),
        projector=str(projector) if projector else None, protocol=protocol, images=images, texts=texts,
        pairs=len(pairs), text_tokens=text_tokens, seed=seed, texts_per_pair=texts_per_pair,
        dtype=str(model.dtype).removeprefix("torch."), dtype_requested=dtype_requested,
        attn_implementation=llm_attention(model), mode=mode, n_boot=n_boot,
        ci=ci, pair_ids=[p.id for p in pairs], defenses=described, **(extra_provenance or {}),
    )
    if write:
        write_json_atomic(folder / "gap.json", json.loads(json.dumps(result, default=float)))
    return result
