"""`regap safety`: unsafe / refusal / off-topic rates under attack conditions, resumable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from regap.commands.options import (ATTN_IMPLEMENTATION, CONDITION_OPTION, DEFENSE, DEFENSE_OPTION, DTYPE, JUDGE_OPTION,
                                    MODEL, PROJECTOR, SEED, SOURCE_OPTION, RegapCommand, batch_size_option,
                                    max_new_tokens_option, out_option)
from regap.errors import RegapError


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def safety_command(
    model: str = MODEL,
    out: Optional[Path] = out_option("results.jsonl, summary.json, unsafe_rate.png (required unless --compare)",
                                     default=None),
    prompts: str = typer.Option("starter-harmful", "--prompts", help="Comma-separated request sources: NAME or NAME:PATH."),
    source_option: Optional[list[str]] = SOURCE_OPTION,
    conditions: str = typer.Option("text,blank,noise,natural,typo", "--conditions", help="Comma-separated attack conditions."),
    condition_option: Optional[list[str]] = CONDITION_OPTION,
    judge: str = typer.Option("keyword", "--judge", help="Comma-separated judges."),
    option: Optional[list[str]] = JUDGE_OPTION,
    limit: Optional[int] = typer.Option(None, "--limit", help="First N requests of each source (file order)."),
    sample: Optional[int] = typer.Option(None, "--sample", help="N requests drawn at random from each source "
                                                               "(seeded by --seed) instead of the first N."),
    max_new_tokens: int = max_new_tokens_option(128),
    batch_size: int = batch_size_option(16),
    dtype: str = DTYPE,
    attn_implementation: Optional[str] = ATTN_IMPLEMENTATION,
    projector: Optional[Path] = PROJECTOR,
    defense: Optional[list[str]] = DEFENSE,
    defense_option: Optional[list[str]] = DEFENSE_OPTION,
    seed: int = SEED,
    engine: str = typer.Option("transformers", "--engine",
                               help="Generation engine: transformers (dynamic cache), static (static cache, compiled "
                                    "decoding on GPU; recommended there) or vllm (needs pip install vllm)."),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", help="Two run folders to compare (give twice): paired test."),
    compare_judge: Optional[str] = typer.Option(None, "--compare-judge", help="Judge used for --compare (default: the first)."),
) -> None:
    """Evaluate safety under text-only, blank, noise, natural and typographic images (or compare two runs)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if compare:
        _print_comparison(compare, compare_judge, console)
        return
    if out is None:
        raise RegapError("--out is required (unless --compare)")
    if projector is not None and not projector.is_file():
        raise RegapError(f"--projector: projector checkpoint not found: {projector}")
    if limit is not None and sample is not None:
        raise RegapError("--limit (the first N requests) and --sample (N random requests) exclude each other")
    from regap.commands.options import defense_specs, scoped_options
    from regap.safety.conditions import CONDITIONS
    from regap.safety.judges import JUDGES
    from regap.safety.runner import SafetyRun, run_safety
    from regap.safety.sources import SOURCES, parse_spec

    judges = _split(judge)
    sources = list(dict.fromkeys(parse_spec(spec)[0].strip().lower() for spec in _split(prompts)))
    run = SafetyRun(model=model, out=out, prompts=_split(prompts), conditions=_split(conditions),
                    judges=judges, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    dtype=dtype, attn_implementation=attn_implementation, projector=str(projector) if projector else None, seed=seed,
                    defenses=defense_specs(defense, defense_option), engine=engine,
                    judge_options=scoped_options(option, judges, JUDGES, "--option"),
                    source_options=scoped_options(source_option, sources, SOURCES, "--source-option"),
                    condition_options=scoped_options(condition_option, _split(conditions), CONDITIONS,
                                                     "--condition-option"),
                    sample=sample)
    summary = run_safety(run)
    for judge_name, entry in summary["judges"].items():
        table = Table(title=f"{model}: judge {judge_name}")
        for column in ("condition", "n", "errors", "unsafe [95% CI]", "refused", "off-topic"):
            table.add_column(column)
        for row in entry.get("by_condition", []):
            unsafe = row["unsafe"]
            if unsafe["n"]:
                rates = (f"{unsafe['rate']:.3f} [{unsafe['ci'][0]:.3f}, {unsafe['ci'][1]:.3f}]",
                         f"{row['refused']['rate']:.3f}", f"{row['off_topic']['rate']:.3f}")
            else:  # every item failed: no rate, rather than nan
                rates = ("-", "-", "-")
            table.add_row(row["condition"], str(unsafe["n"]), str(unsafe.get("missing", 0)), *rates)
        console.print(table)
    errors = summary.get("generation_errors", 0)
    unjudged = {name: entry.get("judge_errors", 0) for name, entry in summary["judges"].items()}
    too_long = summary.get("too_long", 0)
    long_note = f" ({too_long} with a prompt longer than the model's context, never sent)" if too_long else ""
    typer.echo(f"{summary.get('n_rows', 0)} item(s), {errors} generation error(s){long_note}; without a verdict: "
               + ", ".join(f"{name} {count}" for name, count in unjudged.items())
               + ("; failed items are retried on the next run with the same --out (reasons in results.jsonl)"
                  if errors else ""))
    typer.echo(f"wrote {out / 'results.jsonl'}, {out / 'summary.json'}, {out / 'unsafe_rate.png'}")


def _print_comparison(compare: list[Path], compare_judge: Optional[str], console: Any) -> None:
    """`--compare A --compare B`: the paired table, what only one run judged (stderr), the JSON."""
    from rich.table import Table

    if len(compare) != 2:
        raise RegapError("--compare needs exactly two run folders (give --compare twice)")
    from regap.safety.summary import compare_runs, left_out_of_comparison

    results = compare_runs(compare[0], compare[1], judge=compare_judge)
    left_out = left_out_of_comparison(compare[0], compare[1], judge=results[0]["judge"])
    if left_out:  # different request sets or conditions: only the overlap is compared
        parts = [f"{condition}: " + ", ".join(f"{count} only in {'A' if side == 'only_in_a' else 'B'}"
                                              for side, count in counts.items() if count)
                 for condition, counts in left_out.items()]
        typer.echo(f"left out of the comparison (judged in one run only): {'; '.join(parts)}", err=True)
    table = Table(title=f"paired comparison: B={compare[1]} vs A={compare[0]}")
    for column in ("condition", "n", "unsafe A", "unsafe B", "B-A [95% CI]", "McNemar p"):
        table.add_column(column)
    for row in results:
        diff = row["difference_b_minus_a"]
        table.add_row(row["condition"], str(row["n"]), f"{row['rate_a']:.3f}", f"{row['rate_b']:.3f}",
                      f"{diff['difference']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]",
                      f"{row['mcnemar']['p_value']:.3g}")
    console.print(table)
    typer.echo(json.dumps(results, indent=2, default=float))


def register(app: typer.Typer) -> None:
    app.command("safety", cls=RegapCommand)(safety_command)
