"""Measuring the gap: one loaded model on a list of pairs (`measure_gap`: collect, analyse, clean
up), its record with provenance (`measure_to_folder`, the one path `regap gap`, the demo and the
study all measure through), and a whole `regap gap` run (`GapRun`: the checks, the pairs, one
model or two on the same pairs, the lock on OUT, the atomic `gap.json` and Ctrl-C's message).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from regap.errors import RegapError, RunInterrupted
from regap.gap.collect import collect_hidden_states
from regap.gap.measure import analyse, stability
from regap.models.gap_pair import GapPair

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------- a whole run


@dataclass
class GapRun:
    """One `regap gap` run: `model` (under hidden-state `defenses` when given) and, with `compare`,
    a second model measured without them on the same pairs. The fields are `regap gap`'s options
    (`regap gap --help`); `texts` defaults to `starter-benign` for the reference protocol and
    `starter-harmful` for the prompt protocol."""

    model: str
    out: Path
    pairs: int = 100
    protocol: str = "reference"
    images: str = "scenes"
    reuse_images: bool = False
    texts: str | None = None
    compare: str | None = None
    projector: Path | None = None
    compare_projector: Path | None = None
    text_tokens: str = "after-image"
    texts_per_pair: int = 1
    batch_size: int = 8
    dtype: str = "auto"
    attn_implementation: str | None = None
    mode: str = "exact"
    n_boot: int = 1000
    ci: str = "linear"
    seed: int = 0
    stability: bool = False
    keep_hidden: bool = False
    defenses: list[str] = field(default_factory=list)

    @property
    def text_source(self) -> str:
        return self.texts or ("starter-benign" if self.protocol == "reference" else "starter-harmful")

    @property
    def label(self) -> str:
        """The measured model's label: its name, with its defenses."""
        return f"{self.model} + {','.join(self.defenses)}" if self.defenses else self.model

    @property
    def compare_label(self) -> str | None:
        if not self.compare:
            return None
        return self.compare if self.compare != self.model else f"{self.compare} ({self.compare_projector or 'no defense'})"

    def check(self) -> None:
        """Every option checked before any pair or model is made (one-line `RegapError`s)."""
        from regap.checks import check_seed
        from regap.gap.collect import TEXT_TOKEN_MODES
        from regap.gap.measure import CI_METHODS
        from regap.gap.mir import MODES
        from regap.models.attention import check_attention
        from regap.models.gap_pair import PROTOCOLS
        from regap.safety.pairs import check_pair_count

        for flag, path in (("--projector", self.projector), ("--compare-projector", self.compare_projector)):
            if path is not None and not Path(path).is_file():
                raise RegapError(f"{flag}: projector checkpoint not found: {path}")
        check_attention(self.attn_implementation, "--attn-implementation")
        for flag, value, valid in (("--protocol", self.protocol, PROTOCOLS), ("--mode", self.mode, MODES),
                                   ("--text-tokens", self.text_tokens, TEXT_TOKEN_MODES), ("--ci", self.ci, CI_METHODS)):
            if value not in valid:
                raise RegapError(f"{flag} {value!r} is not one of {', '.join(valid)}")
        if self.defenses:  # bad names and options fail before any model is loaded
            from regap.defenses import get_defense
            from regap.defenses.base import check_hidden_state

            check_hidden_state([get_defense(spec) for spec in self.defenses])
        if self.compare and self.compare == self.model and self.compare_projector is None and not self.defenses:
            raise RegapError("--compare names the same model as --model without a different --compare-projector or --defense")
        check_seed(self.seed)
        check_pair_count(self.pairs, self.texts_per_pair)

    def make_pairs(self) -> tuple[list[GapPair], list[str]]:
        """The pairs (before any model: a bad folder fails in seconds) and the unreadable images skipped."""
        from regap.safety.pairs import make_pairs

        problems: list[str] = []
        pairs = make_pairs(self.pairs, images=self.images, texts=self.text_source, seed=self.seed,
                           texts_per_pair=self.texts_per_pair, reuse_images=self.reuse_images, problems=problems)
        return pairs, problems

    def measure(self, pairs: list[GapPair], problems: list[str], progress: bool = True) -> dict[str, dict[str, Any]]:
        """Measure the model (and the comparison) on `pairs`, holding `OUT/.regap.lock`; writes
        `gap.json` (atomically, with the comparison under `compare`) and `gap_layers.png`, and
        returns each label's record. Ctrl-C raises `RunInterrupted` (a measurement does not resume)."""
        from regap.gap.plot import plot_layers
        from regap.files import write_text_atomic
        from regap.run_lock import exclusive_out

        out = Path(self.out)
        with exclusive_out(out), _interrupted_gap(out):  # one run per --out
            results = {self.label: self._measure_one(self.model, self.projector, "a", self.defenses, pairs, problems,
                                                     progress)}
            record = dict(results[self.label])
            if self.compare:
                other = self._measure_one(self.compare, self.compare_projector, "b", [], pairs, problems, progress)
                if len(other["per_layer"]) != len(record["per_layer"]):
                    raise RegapError(f"cannot compare: {self.model} has {len(record['per_layer'])} layers, "
                                     f"{self.compare} has {len(other['per_layer'])}")
                label = self.compare_label
                results[label] = other
                record["compare"] = {"model": label, **other}
            write_text_atomic(out / "gap.json", json.dumps(record, indent=2, default=float))
            plot_layers(results, out / "gap_layers.png")
        return results

    def _measure_one(self, name: str, projector: Path | None, tag: str, defenses: list[str], pairs: list[GapPair],
                     problems: list[str], progress: bool) -> dict[str, Any]:
        from regap.models import load_model, load_projector

        model = load_model(name, dtype=self.dtype, attn_implementation=self.attn_implementation)
        if projector is not None:
            load_projector(model, projector)
        return measure_to_folder(
            model, pairs, self.out, model_name=name, projector=projector, protocol=self.protocol, images=self.images,
            texts=self.text_source, texts_per_pair=self.texts_per_pair, text_tokens=self.text_tokens,
            batch_size=self.batch_size, mode=self.mode, n_boot=self.n_boot, seed=self.seed, ci=self.ci,
            with_stability=self.stability, keep_hidden=self.keep_hidden, progress=progress,
            dtype_requested=self.dtype, defenses=defenses, tag=tag, write=False,
            extra_provenance={"pairs_requested": self.pairs, "reuse_images": self.reuse_images,
                              "image_problems": list(problems)},
        )


@contextmanager
def _interrupted_gap(out: Path) -> Iterator[None]:
    """Ctrl-C: say that nothing was kept (a gap measurement does not resume)."""
    try:
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(f"gap measurement stopped before {out / 'gap.json'} was written",
                             "rerun the command to measure again (it does not resume)") from None


def run_gap(run: GapRun, progress: bool = True, note: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """`run` from start to end: check, make the pairs, measure. Unreadable images skipped in a
    folder are named through `note` (default: a warning log line) before any model loads.
    Returns each label's record (`gap.json` holds the first, with the comparison)."""
    from regap.checks import prepare_out_dir

    run.check()
    prepare_out_dir(run.out)
    pairs, problems = run.make_pairs()
    if problems:
        (note or logger.warning)(image_problems_note(run.images, problems))
    return run.measure(pairs, problems, progress)


def image_problems_note(images: str, problems: list[str]) -> str:
    """The console lines for unreadable images skipped in a folder (the first five)."""
    lines = [f"skipped {len(problems)} unreadable image(s) in {images} (listed in gap.json provenance):"]
    return "\n".join(lines + [f"  {line}" for line in problems[:5]])


def no_interval_reason(record: dict[str, Any]) -> str | None:
    """Why a record has no MIR interval (from its `ci_method`), None when it has one."""
    if record.get("mir_ci") is not None:
        return None
    method = str(record.get("ci_method", ""))
    reason = method.removeprefix("none").lstrip(": ").strip()
    return reason.removeprefix("(").removesuffix(")") or "no interval was computed"
