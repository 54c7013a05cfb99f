"""`regap gap`: measure the modality gap (MIR, layer-0 gap, per-layer curves) of one or two models,
optionally with hidden-state defenses (cmrm, layer0-align) active on the first. The options
become a `regap.gap.run.GapRun`, which does the run; this module prints its table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from regap.commands.options import (ATTN_IMPLEMENTATION, DEFENSE, DEFENSE_OPTION, DTYPE, MODEL, PROJECTOR, SEED,
                                    RegapCommand, batch_size_option, defense_specs, out_option)


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

    from regap.gap.run import GapRun, no_interval_reason, run_gap

    run = GapRun(model=model, out=out, pairs=pairs, protocol=protocol, images=images, reuse_images=reuse_images,
                 texts=texts, compare=compare, projector=projector, compare_projector=compare_projector,
                 text_tokens=text_tokens, texts_per_pair=texts_per_pair, batch_size=batch_size, dtype=dtype,
                 attn_implementation=attn_implementation, mode=mode, n_boot=n_boot, ci=ci, seed=seed,
                 stability=stability_run, keep_hidden=keep_hidden,
                 defenses=defense_specs(defense, defense_option, hidden_state=True))
    results = run_gap(run, note=lambda text: typer.echo(text, err=True))
    table = Table(title=f"modality gap ({protocol} protocol, {pairs} pairs, {images} images)")
    for column in ("model", "MIR", "95% CI", "layer-0 gap", "layer-0 FD"):
        table.add_column(column)
    for label, result in results.items():
        ci = result.get("mir_ci")
        table.add_row(label, f"{result['mir']:.4f}" if result["mir"] is not None else "n/a",
                      f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-", f"{result['layer0_gap']:.4g}", f"{result['layer0_frechet']:.4g}")
    Console().print(table)
    for label, result in results.items():
        reason = no_interval_reason(result)
        if reason is not None and n_boot > 0:
            typer.echo(f"{label}: no 95% interval: {reason}")
    typer.echo(f"wrote {out / 'gap.json'} and {out / 'gap_layers.png'}")


def register(app: typer.Typer) -> None:
    app.command("gap", cls=RegapCommand)(gap_command)
