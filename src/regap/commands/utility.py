"""`regap utility`: held-out synthetic QA and captions, and over-refusal on benign prompts, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from regap.commands.options import (ATTN_IMPLEMENTATION, DEFENSE, DEFENSE_OPTION, DTYPE, MODEL, PROJECTOR, SEED,
                                    RegapCommand, batch_size_option, max_new_tokens_option, out_option)


def utility_command(
    model: str = MODEL,
    out: Path = out_option("a folder for utility.json, utility_responses.jsonl and the cache"),
    n: int = typer.Option(100, "--n", help="Held-out synthetic scenes (about 5 questions each)."),
    seed: int = SEED,
    tasks: str = typer.Option("synthetic-qa,synthetic-caption,over-refusal", "--tasks", show_default=False,
                              help="Comma-separated tasks among synthetic-qa, synthetic-caption and over-refusal "
                                   "(default: all three)."),
    xstest: Optional[Path] = typer.Option(None, "--xstest", help="XSTest prompts CSV: add its safe prompts to over-refusal."),
    projector: Optional[Path] = PROJECTOR,
    max_new_tokens: int = max_new_tokens_option(64),
    batch_size: int = batch_size_option(16),
    dtype: str = DTYPE,
    attn_implementation: Optional[str] = ATTN_IMPLEMENTATION,
    image_size: int = typer.Option(224, "--image-size", help="Side of the rendered held-out images in pixels."),
    refusal_limit: Optional[int] = typer.Option(None, "--refusal-limit",
                                                help="First N prompts of each over-refusal group (default: all)."),
    defense: Optional[list[str]] = DEFENSE,
    defense_option: Optional[list[str]] = DEFENSE_OPTION,
) -> None:
    """Measure utility: held-out synthetic QA accuracy, caption object F1 and over-refusal (resumable)."""
    from rich.console import Console
    from rich.table import Table

    from regap.utility.run import UtilityRun, run_utility
    from regap.utility.suite import RESPONSES_FILE, RESULTS_FILE

    from regap.commands.options import defense_specs

    defenses = defense_specs(defense, defense_option)
    run = UtilityRun(model=model, out=out, tasks=tasks, n=n, seed=seed, xstest=xstest, projector=projector,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                     attn_implementation=attn_implementation, image_size=image_size, refusal_limit=refusal_limit,
                     defenses=defenses)
    summary = run_utility(run, progress=True)  # holds OUT/.regap.lock; Ctrl-C: RunInterrupted
    table = Table(title=f"{model}: utility" + (f" under {' + '.join(defenses)}" if defenses else ""))
    for column in ("task", "part", "n", "score [95% CI]", "better"):
        table.add_column(column)

    def fmt(entry: dict) -> str:
        if entry.get("score") is None:
            return "-"
        low, high = entry["ci"]
        return f"{entry['score']:.3f} [{low:.3f}, {high:.3f}]"

    for task, entry in summary["tasks"].items():
        if "skipped" in entry:
            table.add_row(task, "skipped", "0", entry["skipped"], "")
            continue
        better = "higher" if entry.get("higher_is_better", True) else "lower"
        table.add_row(task, "all", str(entry["n"]), fmt(entry), better)
        for part in ("per_type", "per_category"):
            for name, sub in entry.get(part, {}).items():
                table.add_row("", name, str(sub["n"]), fmt(sub), "")
    Console().print(table)
    failed = sum(entry.get("failed", 0) for entry in summary["tasks"].values())
    if failed:
        too_long = sum(entry.get("too_long", 0) for entry in summary["tasks"].values())
        long_note = f" ({too_long} with a prompt longer than the model's context, never sent)" if too_long else ""
        typer.echo(f"{failed} item(s) got no response{long_note} and are left out of the scores; reasons in "
                   f"{out / RESPONSES_FILE}; a rerun with the same --out retries them")
    typer.echo(f"wrote {out / RESULTS_FILE}, {out / RESPONSES_FILE}")


def register(app: typer.Typer) -> None:
    app.command("utility", cls=RegapCommand)(utility_command)
