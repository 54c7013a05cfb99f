"""`regap gap`: measure the modality gap (MIR, layer-0 gap, per-layer curves) of one or two models,
optionally with hidden-state defenses (cmrm, layer0-align) active on the first."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from regap.commands.options import (ATTN_IMPLEMENTATION, DEFENSE, DEFENSE_OPTION, DTYPE, MODEL, PROJECTOR, SEED,
                                    RegapCommand, batch_size_option, defense_specs, out_option)
from regap.errors import RegapError, RunInterrupted


def measure_model(
    model_name: str, out: Path, *, pair_list: list[Any], pairs: int, protocol: str, images: str, texts: str,
    projector: Optional[Path], text_tokens: str, batch_size: int, texts_per_pair: int, dtype: str, mode: str,
    n_boot: int, seed: int, stability_run: bool, keep_hidden: bool, tag: str, ci: str = "linear",
    reuse_images: bool = False, image_problems: Optional[list[str]] = None, defenses: Optional[list[str]] = None,
    attn_implementation: Optional[str] = None,
) -> dict[str, Any]:
    """Collect hidden states for one model on the given pairs and analyse them; returns the gap record.
    With `defenses` (specs of hidden-state defenses) the hidden states are collected under their
    interventions; calibration files made on first use go to `out/defenses/`."""
    from regap.gap.run import measure_to_folder
    from regap.models import load_model, load_projector

    model = load_model(model_name, dtype=dtype, attn_implementation=attn_implementation)
    if projector is not None:
        load_projector(model, projector)
    return measure_to_folder(
        model, pair_list, out, model_name=model_name, projector=projector, protocol=protocol, images=images,
        texts=texts, texts_per_pair=texts_per_pair, text_tokens=text_tokens, batch_size=batch_size, mode=mode,
        n_boot=n_boot, seed=seed, ci=ci, with_stability=stability_run, keep_hidden=keep_hidden,
        dtype_requested=dtype, defenses=defenses, tag=tag, write=False,
        extra_provenance={"pairs_requested": pairs, "reuse_images": reuse_images,
                          "image_problems": list(image_problems or [])},
    )


@contextmanager
def _interrupted_gap(out: Path) -> Iterator[None]:
    """Ctrl-C: say that nothing was kept (a gap measurement does not resume)."""
    try:
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(f"gap measurement stopped before {out / 'gap.json'} was written",
                             "rerun the command to measure again (it does not resume)") from None


def gap_command(
    model: str = MODEL,
    out: Path = out_option("a folder for gap.json and gap_layers.png"),
    pairs: int = typer.Option(100, "--pairs", help="Number of image-text pairs (the reference protocol uses 100)."),
    protocol: str = typer.Option("reference", "--protocol", help="reference (image, unrelated assistant text) or prompt (image + request)."),
    images: str = typer.Option("scenes", "--images", help="scenes, blank, noise, natural, typo, or a folder of images."),
    reuse_images: bool = typer.Option(False, "--reuse-images",
                                      help="Cycle a folder's images when it has fewer readable ones than --pairs."),
    texts: Optional[str] = typer.Option(None, "--texts", help="Request source spec or .txt file (default: starter-benign for reference, starter-harmful for prompt)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="A second model measured on the same pairs."),
    projector: Optional[Path] = PROJECTOR,
    compare_projector: Optional[Path] = typer.Option(None, "--compare-projector", help="Projector checkpoint for --compare."),
    text_tokens: str = typer.Option("after-image", "--text-tokens", help="after-image (reference) or all-non-image."),
    texts_per_pair: int = typer.Option(1, "--texts-per-pair", help="Join this many texts per pair (more text tokens)."),
    batch_size: int = batch_size_option(8),
    dtype: str = DTYPE,
    attn_implementation: Optional[str] = ATTN_IMPLEMENTATION,
    mode: str = typer.Option("exact", "--mode", help="exact (Fréchet) or reference-fast (the reference code's default; not a distance)."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap replicates over pairs (0: no intervals)."),
    ci: str = typer.Option("linear", "--ci", help="Bootstrap replicates: linear (fast, trace term linearised) or exact (recomputed; small models)."),
    seed: int = SEED,
    stability_run: bool = typer.Option(False, "--stability", help="Also report MIR for 5, 10, 20, 50, 100, ... pairs."),
    keep_hidden: bool = typer.Option(False, "--keep-hidden", help="Keep the spilled hidden states in OUT/.hidden-*."),
    defense: Optional[list[str]] = DEFENSE,
    defense_option: Optional[list[str]] = DEFENSE_OPTION,
) -> None:
    """Measure the modality gap: MIR with a bootstrap interval, layer-0 gap and per-layer curves; with
    --defense (cmrm, layer0-align) --model is measured under it, --compare without (calibrations: OUT/defenses/)."""
    from rich.console import Console
    from rich.table import Table

    from regap.gap.plot import plot_layers

    for flag, path in (("--projector", projector), ("--compare-projector", compare_projector)):
        if path is not None and not path.is_file():
            raise RegapError(f"{flag}: projector checkpoint not found: {path}")
    from regap.gap.collect import TEXT_TOKEN_MODES
    from regap.gap.measure import CI_METHODS
    from regap.gap.mir import MODES
    from regap.models.gap_pair import PROTOCOLS
    from regap.models.attention import check_attention

    check_attention(attn_implementation, "--attn-implementation")
    for flag, value, valid in (("--protocol", protocol, PROTOCOLS), ("--mode", mode, MODES),
                               ("--text-tokens", text_tokens, TEXT_TOKEN_MODES), ("--ci", ci, CI_METHODS)):
        if value not in valid:
            raise RegapError(f"{flag} {value!r} is not one of {', '.join(valid)}")
    defenses = defense_specs(defense, defense_option, hidden_state=True)  # checked before any model is loaded
    if compare and compare == model and compare_projector is None and not defenses:
        raise RegapError("--compare names the same model as --model without a different --compare-projector or --defense")
    from regap.checks import check_seed, prepare_out_dir
    from regap.safety.pairs import make_pairs

    check_seed(seed)
    prepare_out_dir(out)
    texts = texts or ("starter-benign" if protocol == "reference" else "starter-harmful")
    problems: list[str] = []  # the pairs come before any model: a bad folder fails in seconds
    pair_list = make_pairs(pairs, images=images, texts=texts, seed=seed, texts_per_pair=texts_per_pair,
                           reuse_images=reuse_images, problems=problems)
    if problems:
        typer.echo(f"skipped {len(problems)} unreadable image(s) in {images} (listed in gap.json provenance):", err=True)
        for line in problems[:5]:
            typer.echo(f"  {line}", err=True)
    common = dict(pair_list=pair_list, pairs=pairs, protocol=protocol, images=images, texts=texts,
                  text_tokens=text_tokens, texts_per_pair=texts_per_pair,
                  batch_size=batch_size, dtype=dtype, mode=mode, n_boot=n_boot, seed=seed, ci=ci,
                  stability_run=stability_run, keep_hidden=keep_hidden, reuse_images=reuse_images,
                  image_problems=problems, attn_implementation=attn_implementation)
    from regap.run_lock import exclusive_out

    with exclusive_out(out), _interrupted_gap(out):  # one run per --out
        main_label = f"{model} + {','.join(defenses)}" if defenses else model
        results = {main_label: measure_model(model, out, projector=projector, tag="a", defenses=defenses, **common)}
        record = dict(results[main_label])
        if compare:
            other = measure_model(compare, out, projector=compare_projector, tag="b", **common)
            if len(other["per_layer"]) != len(record["per_layer"]):
                raise RegapError(
                    f"cannot compare: {model} has {len(record['per_layer'])} layers, {compare} has {len(other['per_layer'])}"
                )
            label = compare if compare != model else f"{compare} ({compare_projector or 'no defense'})"
            results[label] = other
            record["compare"] = {"model": label, **other}
        (out / "gap.json").write_text(json.dumps(record, indent=2, default=float))
        plot_layers(results, out / "gap_layers.png")
    table = Table(title=f"modality gap ({protocol} protocol, {pairs} pairs, {images} images)")
    for column in ("model", "MIR", "95% CI", "layer-0 gap", "layer-0 FD"):
        table.add_column(column)
    for label, result in results.items():
        ci = result.get("mir_ci")
        table.add_row(label, f"{result['mir']:.4f}" if result["mir"] is not None else "n/a",
                      f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-", f"{result['layer0_gap']:.4g}", f"{result['layer0_frechet']:.4g}")
    Console().print(table)
    typer.echo(f"wrote {out / 'gap.json'} and {out / 'gap_layers.png'}")


def register(app: typer.Typer) -> None:
    app.command("gap", cls=RegapCommand)(gap_command)
