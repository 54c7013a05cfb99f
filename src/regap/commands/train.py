"""`regap pretrain` (stage 1, ReGap) and `regap finetune` (stage 2) from a YAML config.

    regap pretrain CONFIG.yaml [--out DIR] [--resume] [key=value ...]
    regap finetune CONFIG.yaml [--out DIR] [--resume] [key=value ...]

CONFIG is a path or the name of a shipped config (`regap pretrain --list`). For several
processes or GPUs, start the same command under `accelerate launch` (docs/training.md).
"""

from __future__ import annotations

import os
import shlex
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, List, Optional

import typer

from regap.commands.options import RegapCommand, out_option
from regap.errors import RunInterrupted
from regap.run_lock import exclusive_out

# The two stages take the same arguments; each is defined once here (the config's example names the stage's own).
_CONFIGS = {stage: typer.Argument(None, help="Training config: a YAML path or a shipped name (see --list), e.g. "
                                             f"tiny-stage{stage}.") for stage in (1, 2)}
_OVERRIDES = typer.Argument(None, help="key=value overrides, dotted for nested keys (e.g. regap.lam=0.5 max_steps=100).")
_OUT = out_option("the training output folder (default: runs/<config name>)", default=None)
_RESUME = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out.")
_SHOW = typer.Option(False, "--show", help="Print the resolved config (after overrides) and exit.")
_LIST = typer.Option(False, "--list", help="List the shipped training configs and exit.")
_DRY_RUN = typer.Option(False, "--dry-run",
                        help="Print the parameter counts and a per-device memory estimate (weights, gradients, "
                             "optimizer, activations with and without checkpointing) and exit; nothing loads or trains.")
_PROJECTOR = typer.Option(None, "--projector",
                          help="Put a fresh connector of this kind on the model (linear, mlp2x_gelu, qformer, ...); "
                               "the same as the override projector_type=KIND.")


def _list_configs() -> None:
    from regap.train.config import shipped_configs

    for name, path in shipped_configs().items():
        first = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                first = line.lstrip("# ").strip()
                break
        typer.echo(f"{name:36s} {first}")


def _run(stage: int, config: Optional[str], out: Optional[Path], resume: bool, overrides: list[str] | None,
         show: bool, list_configs: bool, projector: Optional[str] = None, dry_run: bool = False) -> None:
    if list_configs:
        _list_configs()
        return
    if config is None:
        raise typer.BadParameter("give a CONFIG (a YAML path or a shipped name; --list shows them)")
    from regap.train.config import load_config

    if projector is not None:
        overrides = [*(overrides or []), f"projector_type={projector}"]
    cfg = load_config(config, list(overrides or []), stage=stage)
    if show:
        typer.echo(cfg.resolved().to_yaml(), nl=False)
        return
    if dry_run:
        from regap.train.estimate import dry_run as estimate

        typer.echo("\n".join(estimate(cfg).lines()))
        return
    from regap.train.loop import resume_checkpoint, train

    name = Path(config).name
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    out_dir = out if out is not None else Path("runs") / name
    words = ["regap", "pretrain" if stage == 1 else "finetune", config, "--out", str(out_dir)]
    command = " ".join([*words, *(["--resume"] if resume else []), *(overrides or [])])
    # one run per --out; under accelerate launch / torchrun only the main process takes the lock
    lock = exclusive_out(out_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    try:
        with lock:
            if resume and resume_checkpoint(out_dir) is None and int(os.environ.get("RANK", "0")) == 0:
                typer.echo(f"--resume: no checkpoint in {out_dir}; starting from scratch")
            result = train(cfg, out_dir, resume=resume, command=command)
    except RunInterrupted as exc:
        exc.resume = "continue with: " + shlex.join([*words, "--resume", *(overrides or [])])
        raise
    if int(os.environ.get("RANK", "0")) != 0:  # one summary line under accelerate launch / torchrun
        return
    if result.status == "stopped":
        typer.echo(f"stopped at step {result.step}/{result.total_steps}; continue with --resume --out {out_dir}")
    else:
        typer.echo(f"done: {result.step} steps; outputs in {out_dir}")


def _stage_command(stage: int, summary: str) -> Callable[..., None]:
    """One CLI command per stage: the two differ only in the stage they train and their help line."""

    def command(
        config: Optional[str] = _CONFIGS[stage],
        overrides: Optional[List[str]] = _OVERRIDES,
        out: Optional[Path] = _OUT,
        resume: bool = _RESUME,
        show: bool = _SHOW,
        list_configs: bool = _LIST,
        projector: Optional[str] = _PROJECTOR,
        dry_run: bool = _DRY_RUN,
    ) -> None:
        _run(stage, config, out, resume, overrides, show, list_configs, projector, dry_run)

    command.__doc__ = summary
    return command


def register(app: typer.Typer) -> None:
    app.command("pretrain", cls=RegapCommand)(
        _stage_command(1, "Stage 1: train the projector on captions (vision encoder and LLM frozen), with ReGap."))
    app.command("finetune", cls=RegapCommand)(
        _stage_command(2, "Stage 2: instruction tuning of projector + LLM (full or LoRA); ReGap off by default."))
