"""`regap defense ...`: list the inference-time defenses, calibrate the hidden-state ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from regap.commands.options import (ATTN_IMPLEMENTATION, DTYPE, MODEL, PROJECTOR, SEED, RegapCommand, RegapGroup,
                                    batch_size_option, out_option)
from regap.errors import RegapError

defense_app = typer.Typer(
    name="defense",
    help="Inference-time defenses: list them, calibrate cmrm and layer0-align for a model.",
    no_args_is_help=True,
    cls=RegapGroup,
)

#: Defenses with a calibration file, and the options (beyond the common ones) each accepts.
CALIBRATED = {"cmrm": (), "layer0-align": ("protocol", "match_norm")}


@defense_app.command("list", cls=RegapCommand)
def list_command() -> None:
    """The registered defenses (use them with --defense NAME or NAME:KEY=VALUE, options also with --defense-option)."""
    from regap.defenses import available_defenses, get_defense

    import sys

    for name in available_defenses():
        cls = type(get_defense(name))
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        typer.echo(f"{name:14s} {doc[0] if doc else ''}")


@defense_app.command("calibrate", cls=RegapCommand)
def calibrate_command(
    name: str = typer.Argument(..., help="cmrm or layer0-align."),
    model: str = MODEL,
    out: Path = out_option("the calibration file (.safetensors; a .json record beside it)"),
    projector: Optional[Path] = PROJECTOR,
    dtype: str = DTYPE,
    attn_implementation: Optional[str] = ATTN_IMPLEMENTATION,
    images: Optional[str] = typer.Option(
        None, "--images", help="Calibration images: blank, noise, scenes, natural, typo or a folder "
        "(default: blank for cmrm, the paper's meaningless image; scenes for layer0-align)."),
    texts: str = typer.Option("starter-benign", "--texts", help="Request source spec or .txt file of calibration texts."),
    pairs: int = typer.Option(100, "--pairs", help="Number of calibration image-text pairs."),
    seed: int = SEED,
    batch_size: int = batch_size_option(8),
    protocol: Optional[str] = typer.Option(
        None, "--protocol", help="layer0-align: reference (default; image, then an assistant text, like captioning "
        "data) or prompt (image + request)."),
    match_norm: bool = typer.Option(False, "--match-norm",
                                    help="layer0-align: also match the mean image-token norm to the text tokens'."),
) -> None:
    """Compute a defense's calibration file for one model (its fingerprint is recorded and checked on use)."""
    if name not in CALIBRATED:
        raise RegapError(f"{name!r} has no calibration; calibrated defenses: {', '.join(CALIBRATED)}")
    given = {"protocol": protocol is not None, "match_norm": match_norm}
    extra = [key for key, used in given.items() if used and key not in CALIBRATED[name]]
    if extra:
        raise RegapError(f"--{extra[0].replace('_', '-')} does not apply to {name}")
    if projector is not None and not projector.is_file():
        raise RegapError(f"--projector: projector checkpoint not found: {projector}")
    if out.suffix != ".safetensors":
        raise RegapError(f"--out {out}: a calibration file must end in .safetensors")
    if pairs < 2:
        raise RegapError(f"--pairs must be >= 2, got {pairs}")
    from regap.checks import check_seed

    check_seed(seed)
    from regap.models.gap_pair import PROTOCOLS

    if protocol is not None and protocol not in PROTOCOLS:
        raise RegapError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    from regap.run_lock import exclusive_file

    with exclusive_file(out):  # one calibration per file: a second one fails at once
        _calibrate(name, model, out, projector, dtype, attn_implementation, images, texts, pairs, seed, batch_size,
                   protocol, match_norm)


def _calibrate(name: str, model: str, out: Path, projector: Optional[Path], dtype: str,
               attn_implementation: Optional[str], images: Optional[str], texts: str, pairs: int, seed: int,
               batch_size: int, protocol: Optional[str], match_norm: bool) -> None:
    """`regap defense calibrate`'s work, once its options are checked and its --out is held."""
    from regap.defenses.calibration_files import save_calibration
    from regap.models import load_model, load_projector
    from regap.safety.pairs import make_pairs

    images = images or ("blank" if name == "cmrm" else "scenes")
    pair_list = make_pairs(pairs, images=images, texts=texts, seed=seed)  # bad sources fail before the model loads
    loaded = load_model(model, dtype=dtype, attn_implementation=attn_implementation)
    if projector is not None:
        load_projector(loaded, projector)
    options: dict[str, Any] = {"images": images, "texts": texts, "seed": seed, "batch_size": batch_size}
    if name == "cmrm":
        from regap.defenses.cmrm import calibrate_cmrm

        tensors, record = calibrate_cmrm(loaded, pair_list, **options)
    else:
        from regap.defenses.layer0_align import calibrate_layer0

        tensors, record = calibrate_layer0(loaded, pair_list, protocol=protocol or "reference", match_norm=match_norm,
                                           **options)
    record["projector"] = str(projector) if projector else None
    written = save_calibration(out, name, tensors, loaded, record, model_name=model)
    if name == "cmrm":
        norms = tensors["shifts"].norm(dim=-1)
        typer.echo(f"cmrm shift norms per layer: {', '.join(f'{v:.3g}' for v in norms.tolist())}")
    else:
        typer.echo(f"layer0-align: scale {record['scale']:.4g}, alpha-scaled centroid gap before "
                   f"{record['centroid_gap_before']:.4g} (0 after, on these pairs)")
    typer.echo(f"wrote {written.path} (sha256 {written.sha256[:16]}, model fingerprint "
               f"{written.record['model_fingerprint']}) and {written.path.with_suffix('.json')}")


def register(app: typer.Typer) -> None:
    """Add the `defense` sub-app to the root `regap` app."""
    app.add_typer(defense_app, name="defense")
