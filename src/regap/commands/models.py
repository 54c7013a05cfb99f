"""`regap models` (list presets; `regap models package`: a trained preset's assets), `regap chat`
(one prompt, optional image) and `regap export` (a standard HF LLaVA folder)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

from regap.commands.options import (ATTN_IMPLEMENTATION, DTYPE, MODEL, PROJECTOR, RegapCommand, RegapGroup,
                                    dtype_option, max_new_tokens_option, model_option, out_option)

EXAMPLE_IMAGE = "example_scene.png"


def example_image_path() -> Path:
    """The bundled example scene (a red circle, a blue square and a green triangle)."""
    return Path(str(resources.files("regap") / "assets" / EXAMPLE_IMAGE))


models_app = typer.Typer(
    help="List model presets (`regap models`), or package a trained one (`regap models package`).",
    invoke_without_command=True,
    cls=RegapGroup,
)


@models_app.callback(invoke_without_command=True)
def models_command(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the presets as JSON."),
) -> None:
    """List model presets, whether they need a hub, and the state of their projector; for trained
    presets also their base, what they were trained on, and whether their assets are verified."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from regap.models.loading.presets import PRESETS
    from regap.models.loading.trained import describe_training, inspect_assets

    rows = []
    for p in PRESETS.values():
        row = {"name": p.name, "summary": p.summary, "needs_hub": p.needs_hub, "projector": p.projector_note,
               "base": p.base, "assets": None, "training": None}
        if p.trained:
            report = inspect_assets(p)
            manifest = report.manifest or {}
            row.update(assets=report.to_dict(), training={"training": manifest.get("training"),
                                                          "info": manifest.get("info"),
                                                          "summary": describe_training(report.manifest)})
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="regap model presets")
    for column in ("name", "summary", "hub", "projector"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["summary"], "yes" if row["needs_hub"] else "no (offline)", row["projector"])
    Console().print(table)
    trained = [row for row in rows if row["base"] is not None]
    if trained:
        table = Table(title="trained presets")
        for column in ("name", "base", "trained on / settings", "assets"):
            table.add_column(column, overflow="fold")
        for row in trained:
            assets = row["assets"]
            state = assets["state"] if assets["state"] in ("verified", "not packaged") else \
                f"{assets['state']}: {assets['detail']}"
            table.add_row(row["name"], row["base"], row["training"]["summary"], state)
        Console().print(table)
    typer.echo("Also accepted wherever a model is asked for: a folder saved by regap, or an HF LLaVA checkpoint.")


@models_app.command("package", cls=RegapCommand)
def package_command(
    train_out: Path = typer.Argument(..., help="A finished stage-2 LoRA training output folder (regap finetune --out)."),
    name: str = typer.Option(..., "--name", help="The trained preset's name (e.g. tiny-llava)."),
    dest: Path = typer.Option(..., "--dest", help="Folder for the assets (e.g. src/regap/assets/presets/tiny-llava)."),
    info: Optional[str] = typer.Option(None, "--info", help="JSON object (or a .json file) recorded in the manifest: "
                                                            "what the model is, e.g. '{\"study\": \"tiny-study\", \"lambda\": 0}'."),
    dtype: Optional[str] = dtype_option(None, show_default="as training saved them"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --dest."),
) -> None:
    """Package a stage-2 LoRA output as a trained preset's assets and print the sha256 pins to paste
    into src/regap/models/loading/presets.py."""
    from regap.train.package import format_pins, package_preset

    result = package_preset(train_out, name, dest, info=_read_info(info), dtype=dtype, overwrite=overwrite)
    typer.echo(f"wrote {result.dest}: {len(result.pins)} files, {result.total_bytes / 1e6:.2f} MB "
               f"(base {result.manifest['base']['model']})")
    typer.echo(f"# pins for preset {name!r}: paste as pins= of its Preset in src/regap/models/loading/presets.py")
    typer.echo(format_pins(result.pins))


def _read_info(value: str | None) -> dict | None:
    """`--info`: a JSON object, given inline or as the path of a .json file."""
    from regap.errors import RegapError

    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise RegapError(f"--info: neither a JSON object nor a file: {value}")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegapError(f"--info: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise RegapError("--info must be a JSON object ({\"key\": value, ...})")
    return data


def chat_command(
    prompt: str = typer.Argument(..., help="The user's message. An <image> marker places the image; else it goes first."),
    model: str = MODEL,
    image: Optional[str] = typer.Option(None, "--image", "-i", help="Image file to attach (a local file; URLs are "
                                                                    "not fetched)."),
    example_image: bool = typer.Option(False, "--example-image", help="Attach the bundled example scene."),
    projector: Optional[Path] = PROJECTOR,
    max_new_tokens: int = max_new_tokens_option(128),
    dtype: str = DTYPE,
    template: Optional[str] = typer.Option(None, "--template", help="chat (tokenizer's), vicuna_v1 or plain."),
    attn_implementation: Optional[str] = ATTN_IMPLEMENTATION,
    as_json: bool = typer.Option(False, "--json", help="Print the answer with its provenance as JSON."),
    engine: str = typer.Option("transformers", "--engine", help="Generation engine: transformers, static or vllm."),
) -> None:
    """Ask the model one question, optionally about an image."""
    from regap.errors import RegapError
    from regap.images import load_image
    from regap.models import DecodingSettings, llm_attention, load_model, load_projector
    from regap.models.fingerprint import model_fingerprint
    from regap.provenance import provenance

    images = []
    if image is not None and example_image:
        raise typer.BadParameter("give --image or --example-image, not both")
    image_path = example_image_path() if example_image else image
    if image_path is not None:
        images.append(load_image(image_path))
    settings = DecodingSettings(max_new_tokens=max_new_tokens, batch_size=1, engine=engine)
    lvlm = load_model(model, dtype=dtype, attn_implementation=attn_implementation)
    if projector is not None:
        load_projector(lvlm, projector)
    length = lvlm.prompt_lengths(*lvlm.prepare_conversations([prompt], [images]), template=template)[0]
    too_long = lvlm.context_overflow(length, max_new_tokens)
    if too_long is not None:  # never sent: its prefill alone would run for minutes
        raise RegapError(f"{too_long}: shorten the prompt or lower --max-new-tokens")
    answer = lvlm.generate([prompt], [images], settings, template=template)[0]
    if as_json:
        record = {
            "prompt": prompt, "image": str(image_path) if image_path else None, "answer": answer,
            "provenance": provenance(
                model=model, model_config=lvlm.config.to_dict(), model_fingerprint=model_fingerprint(lvlm),
                projector=str(projector) if projector else None, template=template or lvlm.config.template,
                decoding=settings.to_dict(), dtype=str(lvlm.dtype).removeprefix("torch."), dtype_requested=dtype,
                attn_implementation=llm_attention(lvlm),
            ),
        }
        typer.echo(json.dumps(record, indent=2))
    else:
        typer.echo(answer)


def export_command(
    model: str = model_option(...),
    out: Path = out_option("a folder for the HF LLaVA files (absent or empty)"),
    projector: Optional[Path] = PROJECTOR,
    dtype: str = dtype_option("float32"),
) -> None:
    """Export a model as a standard HF LLaVA folder (LlavaForConditionalGeneration + processor + chat template)."""
    from regap.models.export import export_model

    record = export_model(model, out, projector=projector, dtype=dtype)
    typer.echo(f"wrote {out}: LlavaForConditionalGeneration + LlavaProcessor (chat template from "
               f"{record['chat_template']!r}, {record['dtype']} weights"
               f"{', LoRA adapter merged' if record['lora_merged'] else ''}); load with transformers or "
               "pipeline('image-text-to-text')")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command("chat", cls=RegapCommand)(chat_command)
    app.command("export", cls=RegapCommand)(export_command)
