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

    from regap.utility.suite import RESPONSES_FILE, RESULTS_FILE, run_utility

    from regap.errors import RunInterrupted
    from regap.run_lock import exclusive_out

    from regap.commands.options import defense_specs

    defenses = defense_specs(defense, defense_option)
    with exclusive_out(out):
        try:
            summary = run_utility(model, out, tasks=tasks, n=n, seed=seed, xstest=xstest, projector=projector,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                                  attn_implementation=attn_implementation,
                                  image_size=image_size, refusal_limit=refusal_limit, defenses=defenses,
                                  progress=True)
        except KeyboardInterrupt:
            raise RunInterrupted(f"utility run stopped; the responses generated so far are cached in {out}") from None
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
    typer.echo(f"wrote {out / RESULTS_FILE}, {out / RESPONSES_FILE}")


def register(app: typer.Typer) -> None:
    app.command("utility", cls=RegapCommand)(utility_command)
