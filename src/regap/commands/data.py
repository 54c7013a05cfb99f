"""`regap data ...`: make the synthetic data set and inspect LLaVA JSON files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from regap.commands.options import SEED, RegapCommand, RegapGroup, out_option

data_app = typer.Typer(
    name="data",
    help="Training data: generate the synthetic shape set, inspect LLaVA JSON files.",
    no_args_is_help=True,
    cls=RegapGroup,
)


@data_app.command("synth", cls=RegapCommand)
def synth_command(
    n: int = typer.Option(..., "--n", help="Number of images (and captions) to generate."),
    out: Path = out_option("a folder for the images and JSON files (empty unless --overwrite)"),
    seed: int = SEED,
    image_size: int = typer.Option(224, "--image-size", help="Square image side in pixels."),
    split_name: str = typer.Option(
        "train", "--split-name", help="Split name: part of every id and of each item's random stream."
    ),
    conversations: str = typer.Option(
        "sampled", "--conversations",
        help="instructions.json per scene: sampled (1-3 of its questions) or all (every question, multi-turn).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty folder."),
) -> None:
    """Render a deterministic synthetic caption / instruction / QA set in LLaVA JSON layout."""
    from regap.data.synth import generate_synthetic

    manifest = generate_synthetic(
        out, n, seed=seed, image_size=image_size, split_name=split_name, conversations=conversations,
        overwrite=overwrite, progress=n >= 2000
    )
    counts = manifest.counts
    typer.echo(
        f"wrote {counts['images']} images, {counts['captions']} captions, {counts['instructions']} "
        f"instruction conversations ({counts['instruction_turns']} turns), {counts['qa_eval']} QA items to {out}"
    )
    typer.echo(f"captions.json sha256 {manifest.captions_sha256}")


@data_app.command("inspect", cls=RegapCommand)
def inspect_command(
    json_path: Path = typer.Argument(..., help="LLaVA JSON list or JSONL file."),
    image_root: Optional[Path] = typer.Option(
        None, "--image-root", help="Folder the 'image' paths are relative to (default: the file's folder)."
    ),
    max_items: Optional[int] = typer.Option(None, "--max-items", help="Stop after this many valid samples."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report as JSON here."),
    show: int = typer.Option(20, "--show", help="How many malformed rows / missing images to list."),
) -> None:
    """Validate a LLaVA JSON file: counts, malformed rows and missing images."""
    from rich.console import Console
    from rich.table import Table

    from regap.data.llava_json import LlavaJsonDataset

    dataset = LlavaJsonDataset(json_path, image_root, max_items=max_items)
    info = dataset.report
    with_image = sum(1 for path in dataset.image_paths() if path is not None)
    console = Console()

    summary = Table(title=str(json_path), caption=f"image root: {dataset.image_root}")
    summary.add_column("what")
    summary.add_column("count", justify="right")
    summary.add_row("rows read", str(info.rows_seen))
    summary.add_row("usable samples", str(info.loaded))
    summary.add_row("  with an image", str(with_image))
    summary.add_row("  text only", str(info.loaded - with_image))
    summary.add_row("  <image> marker added", str(info.image_marker_added))
    summary.add_row("malformed rows", str(len(info.malformed)))
    summary.add_row("missing images", str(len(info.missing_images)))
    console.print(summary)

    index_label = "line" if info.index_kind == "line_number" else "index"
    if info.malformed:
        table = Table(title="malformed rows (skipped)")
        table.add_column(index_label, justify="right")
        table.add_column("reason")
        for index, reason in info.malformed[:show]:
            table.add_row(str(index), reason)
        console.print(table)
        if len(info.malformed) > show:
            console.print(f"... and {len(info.malformed) - show} more malformed rows")
    if info.missing_images:
        table = Table(title="missing images (skipped)", caption=f"image root: {dataset.image_root}")
        table.add_column("image")
        for path in info.missing_images[:show]:
            table.add_row(path)
        console.print(table)
        if len(info.missing_images) > show:
            console.print(f"... and {len(info.missing_images) - show} more missing images")
    if report is not None:
        written = dataset.write_report(report)
        console.print(f"report written to {written}")


def register(app: typer.Typer) -> None:
    """Add the `data` sub-app to the root `regap` app."""
    app.add_typer(data_app, name="data")
