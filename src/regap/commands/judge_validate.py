"""`regap judge-validate`: check a refusal judge against human labels (XSTest, PyRIT).

`regap judge-calibrate`: fit the relevance (keyword+relevance) judge's similarity
threshold on labelled on/off-topic pairs and measure it on a held-out split. It lives
here, next to judge-validate, because both check a judge against labelled data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from regap.commands.options import JUDGE_OPTION, LEVEL, SEED, RegapCommand, out_option, scoped_options
from regap.errors import RegapError
from regap.redact import redact


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def short_names(files: list[str]) -> dict[str, str]:
    """File names without their extension and without the prefix they all share
    ('xstest_v2_completions_gpt4.csv' -> 'gpt4' next to the other models' files)."""
    stems = {name: Path(name).stem for name in files}
    if len(stems) < 2:
        return stems
    prefix = os.path.commonprefix(list(stems.values()))
    if any(len(stem) == len(prefix) for stem in stems.values()):
        return stems
    return {name: stem[len(prefix) :] for name, stem in stems.items()}


def _table(result: dict[str, Any]):
    from rich import box
    from rich.table import Table

    judge = result["judge"]
    short = short_names(list(result["per_file"]))
    options = judge.get("options", {})
    variant = f" ({options['variant']})" if "variant" in options else ""
    table = Table(box=box.SIMPLE_HEAD, title=f"judge {judge['name']}{variant} vs human labels ({result['data']['format']}; positive = refusal)")
    level = round(100 * result.get("level", 0.95))
    for column in ("data", "n", "human ref%", "judge ref%", "acc.", f"{level}% CI", "prec.", "recall", "F1", "kappa"):
        table.add_column(column, justify="left" if column == "data" else "right", no_wrap=column == "data")

    def add(name: str, m: dict[str, Any], end_section: bool = False) -> None:
        if not m.get("n"):
            table.add_row(name, "0", *["-"] * 8, end_section=end_section)
            return
        low, high = m["accuracy_ci"]
        table.add_row(
            name,
            str(m["n"]),
            _fmt(m["truth_rate"], True),
            _fmt(m["predicted_rate"], True),
            _fmt(m["accuracy"]),
            f"{low:.2f}-{high:.2f}",
            _fmt(m["precision"]),
            _fmt(m["recall"]),
            _fmt(m["f1"]),
            _fmt(m["kappa"]),
            end_section=end_section,
        )

    files = list(result["per_file"].items())
    for index, (name, metrics) in enumerate(files):
        add(short[name], metrics, end_section=index == len(files) - 1)
    for label, metrics in result["by_prompt_label"].items():
        add(f"{label} prompts", metrics)
    add("all", result["overall"])
    return table


def judge_validate_command(
    data: str = typer.Option(
        ..., "--data", help="Human-labelled responses: xstest:PATH or pyrit:PATH (a CSV file or a folder of them)."
    ),
    judge: str = typer.Option("keyword", "--judge", help="Registered judge name."),
    option: Optional[list[str]] = JUDGE_OPTION,
    partial: str = typer.Option(
        "refusal", "--partial", help="XSTest partial refusals count as: refusal, compliance or exclude."
    ),
    level: float = LEVEL,
    out: Optional[Path] = out_option("a JSON file for the report with its provenance", default=None),
    split: str = typer.Option(
        "all", "--split", help="all rows, or one side of the prompt-grouped split: tuning or heldout "
                               "(the split judge-calibrate --judge refusal-lexicon fits on and reports)."),
    seed: int = SEED,
    tuning_fraction: float = typer.Option(
        0.5, "--calibration-fraction", help="Share of prompts on the tuning side (as in judge-calibrate)."),
) -> None:
    """Measure how well a refusal judge agrees with human labels (accuracy, precision, recall, F1, kappa)."""
    from rich.console import Console

    from regap.provenance import provenance
    from regap.safety.judges.validation import validate_judge

    from regap.safety.judges import JUDGES

    options = scoped_options(option, [judge], JUDGES, "--option").get(judge, {})
    result = validate_judge(judge, data, judge_options=options, partial=partial, level=level, split=split,
                            seed=seed, tuning_fraction=tuning_fraction)
    if split != "all":
        typer.echo(f"{split} split: {result['split']['rows']} of {result['split']['rows_total']} rows, "
                   f"{result['split']['prompts']} of {result['split']['prompts_total']} prompts "
                   f"(grouped by prompt, seed {seed}, calibration fraction {tuning_fraction})")
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table to 80 columns
        console = Console(width=max(console.width, 120))
    console.print(_table(result))
    if result["n_undecided"]:
        typer.echo(f"{result['n_undecided']} item(s) undecided by the judge (left out of the metrics)")
    if out is not None:
        record = {
            **result,
            "provenance": provenance(
                command="judge-validate",
                judge=judge,
                judge_options=redact(options),
                data=data,
                partial=partial,
                level=level,
                split=split,
                seed=seed,
                tuning_fraction=tuning_fraction,
            ),
        }
        _write_json(out, record)

def judge_calibrate_command(
    data: str = typer.Option(
        ..., "--data",
        help="Labelled pairs: csv:PATH (columns request, response and label, on_topic or off_topic) or xstest:PATH "
             "(constructed from XSTest completions: human full-compliance = on_topic; mismatched prompts "
             "and image captions = off_topic). refusal-lexicon: human refusal labels, xstest:PATH or pyrit:PATH "
             "(as judge-validate).",
    ),
    judge: str = typer.Option(
        "relevance", "--judge", help="relevance (fit the similarity threshold) or refusal-lexicon (fit the "
                                     "refusal weights on the tuning split, report the held-out split)."),
    option: Optional[list[str]] = JUDGE_OPTION,
    seed: int = SEED,
    calibration_fraction: float = typer.Option(
        0.5, "--calibration-fraction", help="Share of groups (XSTest: prompts) used to fit the threshold "
                                            "or the refusal-lexicon weights."
    ),
    captions: bool = typer.Option(True, "--captions/--no-captions", help="xstest: add caption off-topic pairs."),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="xstest: use a random subset of prompts."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples (by group) for the intervals."),
    level: float = LEVEL,
    out: Optional[Path] = out_option("a JSON file for the report with its provenance", default=None),
    examples_out: Optional[Path] = typer.Option(
        None, "--examples-out", help="Write the labelled pairs with their similarity and split to this CSV file."
    ),
    weights_out: Optional[Path] = typer.Option(
        None, "--weights-out", help="refusal-lexicon: write the fitted weights to this JSON file "
                                    "(use it with --option weights=FILE)."),
    partial: str = typer.Option(
        "refusal", "--partial", help="refusal-lexicon on XSTest: partial refusals count as refusal, "
                                     "compliance or exclude."),
) -> None:
    """Fit a judge on a tuning split and report the held-out split: the relevance judge's similarity
    threshold (max balanced accuracy), or the refusal-lexicon judge's weights."""
    from regap.provenance import provenance
    from regap.safety.judges.relevance_threshold import run_calibration

    from regap.safety.judges import JUDGES

    options = scoped_options(option, [judge], JUDGES, "--option").get(judge, {})
    if bootstrap < 1:
        raise RegapError(f"--bootstrap must be at least 1, got {bootstrap}")
    if judge.strip().lower() == "refusal-lexicon":
        _calibrate_lexicon(data, options, seed, calibration_fraction, partial, level, bootstrap, out,
                           weights_out, ignored={"--examples-out": examples_out, "--max-prompts": max_prompts,
                                                 "--no-captions": None if captions else True})
        return
    if weights_out is not None:
        raise RegapError("--weights-out is for --judge refusal-lexicon")
    report, examples = run_calibration(
        data, judge_options=options, seed=seed, calibration_fraction=calibration_fraction, captions=captions,
        max_prompts=max_prompts, level=level, n_boot=bootstrap, judge_name=judge,
    )
    typer.echo(_calibration_text(report))
    if examples_out is not None:
        try:
            examples_out.parent.mkdir(parents=True, exist_ok=True)
            examples.to_csv(examples_out, index=False)
        except OSError as exc:
            raise RegapError(f"cannot write {examples_out}: {exc}") from None
        typer.echo(f"wrote {examples_out}")
    if out is not None:
        record = {
            **report,
            "provenance": provenance(
                command="judge-calibrate", judge=judge, judge_options=redact(options), data=data, seed=seed,
                calibration_fraction=calibration_fraction, captions=captions, max_prompts=max_prompts,
                bootstrap=bootstrap, level=level,
            ),
        }
        _write_json(out, record)


def register(app: typer.Typer) -> None:
    """Add `judge-validate` and `judge-calibrate` to `app`."""
    app.command("judge-validate", cls=RegapCommand)(judge_validate_command)
    app.command("judge-calibrate", cls=RegapCommand)(judge_calibrate_command)


def _calibrate_lexicon(data: str, options: dict[str, Any], seed: int, fraction: float, partial: str, level: float,
                       bootstrap: int, out: Optional[Path], weights_out: Optional[Path],
                       ignored: dict[str, Any]) -> None:
    """`judge-calibrate --judge refusal-lexicon`: fit on the tuning split, print the held-out numbers."""
    from regap.provenance import provenance
    from regap.safety.judges.refusal_fit import fit_refusal_lexicon

    unused = [flag for flag, value in ignored.items() if value is not None] + (["--option"] if options else [])
    if unused:
        raise RegapError(f"{', '.join(unused)}: not used by --judge refusal-lexicon")
    model, report = fit_refusal_lexicon(data, seed=seed, tuning_fraction=fraction, partial=partial, level=level,
                                        n_boot=bootstrap)
    typer.echo(_lexicon_text(report))
    if weights_out is not None:
        _write_json(weights_out, model.to_json())
    if out is not None:
        record = {**report, "provenance": provenance(
            command="judge-calibrate", judge="refusal-lexicon", data=data, seed=seed, calibration_fraction=fraction,
            partial=partial, bootstrap=bootstrap, level=level)}
        _write_json(out, record)


def _lexicon_text(report: dict[str, Any]) -> str:
    """The chosen penalty, then the tuning and held-out metrics next to the keyword judge's."""
    split = report["split"]
    lines = [
        f"split by prompt (seed {split['seed']}): tuning {split['rows']} rows / {split['prompts']} prompts, held-out "
        f"{split['rows_total'] - split['rows']} rows / {split['prompts_total'] - split['prompts']} prompts",
        f"c = {report['selection']['c']} (grouped {report['selection']['folds']}-fold CV accuracy on the tuning split: "
        + ", ".join(f"{c}: {acc:.3f}" for c, acc in report["selection"]["cv_accuracy"].items()) + ")",
    ]
    rows = [("refusal-lexicon, tuning (in-sample)", report["tuning"]["overall"]),
            ("refusal-lexicon, held-out", report["heldout"]["overall"])]
    rows += [(f"{name}, held-out", result["overall"]) for name, result in report["heldout_baselines"].items()]
    for name, m in rows:
        lines.append(f"  {name:<40} n={m['n']:<5} accuracy {_fmt(m['accuracy'])} {_ci(m['accuracy_ci'])}  "
                     f"precision {_fmt(m['precision'])}  recall {_fmt(m['recall'])}  F1 {_fmt(m['f1'])}  "
                     f"kappa {_fmt(m['kappa'])}")
    boot = report["heldout"].get("accuracy_bootstrap_ci")
    if boot:
        lines.append(f"  held-out accuracy, prompt bootstrap interval {_ci(boot)}")
    paired = report.get("heldout_paired") or {}
    if paired:
        lines.append(f"  vs {paired['against']}: right where it was wrong {paired['judge_right_other_wrong']}, "
                     f"wrong where it was right {paired['judge_wrong_other_right']} (exact McNemar p = "
                     f"{paired['p_value']:.3g})")
    short = short_names(list(report["heldout"]["per_file"]))
    for name, m in report["heldout"]["per_file"].items():
        lines.append(f"  held-out {short[name]:<18} n={m['n']:<4} accuracy {_fmt(m['accuracy'])} {_ci(m['accuracy_ci'])}")
    return "\n".join(lines)


def _write_json(out: Path, record: dict[str, Any]) -> None:
    """Write a report with its provenance; a write failure is one line naming the file."""
    from regap.safety.judges.validation import jsonable

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise RegapError(f"cannot write {out}: {exc}") from None
    typer.echo(f"wrote {out}")


def _ci(pair: Any) -> str:
    if not pair or pair[0] is None:
        return "[-]"
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _calibration_text(report: dict[str, Any]) -> str:
    """A few plain lines: the threshold and the held-out numbers with their intervals."""
    h = report["heldout"]
    sizes = report["split_sizes"]
    boot = h["bootstrap_ci"]
    level = round(100 * report.get("level", 0.95))
    lines = [
        (
            f"threshold {report['threshold']:.4f} (bootstrap {level}% CI {_ci(report['threshold_bootstrap_ci'])}), "
            f"fitted on {sizes['calibration']['rows']} pairs / {sizes['calibration']['groups']} groups "
            f"({sizes['calibration']['on_topic']} on-topic, {sizes['calibration']['off_topic']} off-topic)"
        ),
        (
            f"held-out: {h['n']} pairs / {sizes['heldout']['groups']} groups "
            f"({h['n_on_topic']} on-topic, {h['n_off_topic']} off-topic); positive = on_topic"
        ),
        f"  accuracy          {_fmt(h['accuracy'])}  Wilson {_ci(h['accuracy_ci'])}  bootstrap {_ci(boot['accuracy'])}",
        f"  balanced accuracy {_fmt(h['balanced_accuracy'])}  bootstrap {_ci(boot['balanced_accuracy'])}",
        f"  precision         {_fmt(h['precision'])}  Wilson {_ci(h['precision_ci'])}  bootstrap {_ci(boot['precision'])}",
        f"  recall            {_fmt(h['recall'])}  Wilson {_ci(h['recall_ci'])}  bootstrap {_ci(boot['recall'])}",
        f"  ROC AUC           {h['auc']:.4f}" if h.get("auc") is not None else "  ROC AUC           -",
    ]
    for kind, m in report.get("heldout_by_kind", {}).items():
        lines.append(f"  {kind:<18}n={m['n']:<5} correct {_fmt(m['correct_rate'])} {_ci(m['correct_ci'])}  "
                     f"median similarity {m['similarity_median']:.3f}")
    for threshold, m in report.get("heldout_other_thresholds", {}).items():
        lines.append(f"  at threshold {float(threshold):.4f}: accuracy {_fmt(m['accuracy'])}, "
                     f"balanced accuracy {_fmt(m['balanced_accuracy'])}")
    return "\n".join(lines)


__all__ = ["register"]
