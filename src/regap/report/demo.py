"""The report of a `regap demo` run: report.md and a self-contained report.html from the run's
files only (`regap report RUN_DIR`, and the last step of `regap demo`).

Every section reads its own files; a missing file is named in the report (and returned),
and the other sections still render. Images are inlined into the HTML as data URIs, so the
page references no external resource.

A run folder may come from someone else, so nothing read from it is trusted as markup: every
value is escaped for markdown (`_md`, `_code`: no links, images or table breaks smuggled in),
and the HTML is rendered with raw HTML turned off, so a ``<script>`` in a file name, a
setting or a judge name shows up as text.

A demo run with both connector families (`regap demo --family both`) holds the MLP study at
the root and the Q-Former study under `qformer/`: the report then opens with the two side by
side (a column per family, both families' figures) and gives each family's sections after it.
With one family the report is that family's sections alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regap.errors import RegapError
from regap.report.html import check_reports_overwritable, write_reports

#: Connector families of a demo run: (name, folder under the run folder, column title).
FAMILIES = (("mlp", "", "MLP projector"), ("qformer", "qformer", "Q-Former"))
#: The figures each family's study writes (relative to its folder), with captions.
FAMILY_FIGURES = (("training_curves.png", "training curves"), ("gap_compare/gap_layers.png", "per-layer gap"),
                  ("safety_conditions.png", "unsafe rate per condition"), ("correlate/correlation.png", "MIR vs unsafe rate"))


@dataclass
class ReportBuilder:
    root: Path
    lines: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    base: str = ""  # the family's folder under root ("" or "qformer/"): every section reads below it
    title: str = ""  # prefixed to section headings (a family's name when several are shown)
    inline_figures: bool = True  # False when the figures are already shown side by side

    # ---- reading ---------------------------------------------------------------------------
    def load(self, relative: str, expected: bool = True) -> Any | None:
        """A run file's JSON; a missing one is listed as missing when the run was meant to make it."""
        relative = self.base + relative
        path = self.root / relative
        if not path.exists():
            if expected:
                self.missing.append(relative)
            return None
        try:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            self.missing.append(f"{relative} (unreadable: line {exc.lineno}: {exc.msg})")
            return None

    def figure(self, relative: str, caption: str, force: bool = False) -> None:
        relative = self.base + relative
        path = self.root / relative
        if not path.exists():
            self.missing.append(relative)
            if self.inline_figures or force:
                self.lines.append(f"*Figure missing: `{relative}`.*\n")
            return
        if self.inline_figures or force:
            self.figures.append(path)
            self.lines.append(f"![{caption}]({relative})\n")

    def folder(self) -> Path:
        return self.root / self.base

    def settings(self) -> dict[str, Any]:
        """The demo settings the family ran with (summary.json), {} when unknown."""
        path = self.folder() / "summary.json"
        try:
            summary = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return {}
        settings = summary.get("setup", {}).get("settings") if isinstance(summary, dict) else None
        return settings if isinstance(settings, dict) else {}

    def attack_variants(self) -> set[str]:
        """The checkpoints a demo measures the attack-input gap of: the final plain and ReGap ones."""
        settings = self.settings()
        if "regap_lambda" not in settings:
            return set()
        final = _final_variants(self)
        return {final[label] for label in ("plain", f"regap-l{settings['regap_lambda']:g}") if label in final}

    def variants(self) -> list[str]:
        folder = self.folder() / "eval"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    # ---- writing helpers ---------------------------------------------------------------------
    def heading(self, text: str) -> None:
        self.lines.append(f"\n## {self.title}{text}\n")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        for row in rows:
            self.lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
        self.lines.append("")

    def note(self, text: str) -> None:
        self.lines.append(text + "\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return _md(value)


#: Markdown characters that could turn a value into markup: links and images ([ ] !), autolinks
#: and HTML (< >), emphasis and code (* _ `), table cells (|) and the escape itself.
_MARKDOWN_SPECIALS = str.maketrans({c: "\\" + c for c in "\\`*_[]<>!|"})


def _md(value: Any) -> str:
    """A value read from a run file as plain markdown text, on one line."""
    return " ".join(str(value).split()).translate(_MARKDOWN_SPECIALS)


def _code(value: Any, in_table: bool = False) -> str:
    """A value read from a run file as a code span, whatever backticks it holds (a longer fence)."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    span = f"{fence}{pad}{text}{pad}{fence}"
    return span.replace("|", "\\|") if in_table else span


def _setup(b: ReportBuilder) -> None:
    b.heading("Setup and provenance")
    summary = b.load("summary.json")
    if summary is None:
        b.note("`summary.json` is missing: setup unknown.")
        return
    setup = summary.get("setup", {})
    rows = [[key, json.dumps(value) if isinstance(value, (dict, list)) else value] for key, value in setup.items()]
    b.table(["item", "value"], rows)
    if summary.get("notes"):
        for note in summary["notes"]:
            b.note(f"- {_md(note)}")


def _training(b: ReportBuilder) -> None:
    b.heading("Training")
    b.figure("training_curves.png", "captioning loss and layer-0 gap during stage-1 training")


def _gap(b: ReportBuilder) -> None:
    b.heading("Modality gap")
    rows = []
    for variant in b.variants():
        gap = b.load(f"eval/{variant}/gap/gap.json")
        if gap:
            rows.append([variant, gap.get("mir"), gap.get("mir_ci") or "-", gap.get("layer0_gap"), gap.get("n_pairs")])
    if rows:
        b.table(["model", "MIR", "MIR 95% CI", "layer-0 gap", "pairs"], rows)
    b.figure("gap_compare/gap_layers.png", "per-layer gap, plain vs ReGap")
    attack = []
    expected = b.attack_variants()
    for variant in b.variants():
        gap = b.load(f"eval/{variant}/gap_attack/gap.json", expected=variant in expected)
        if gap:
            attack.append([variant, gap.get("mir"), gap.get("mir_ci") or "-", gap.get("layer0_gap")])
    if attack:
        b.note("Gap measured on the attack inputs themselves (harmful requests with the attack images):")
        b.table(["model", "MIR", "MIR 95% CI", "layer-0 gap"], attack)


def _safety(b: ReportBuilder) -> None:
    b.heading("Safety: unsafe rate per condition")
    for variant in b.variants():
        summary = b.load(f"eval/{variant}/safety/summary.json")
        if not summary:
            continue
        for judge, entry in summary.get("judges", {}).items():
            rows = [[r["condition"], r["unsafe"]["rate"], r["unsafe"]["ci"], r["refused"]["rate"], r["off_topic"]["rate"],
                     r["unsafe"]["n"]] for r in entry.get("by_condition", [])]
            b.note(f"**{_md(variant)}**, judge {_code(judge)}")
            b.table(["condition", "unsafe", "95% CI", "refused", "off-topic", "n"], rows)
    b.figure("safety_conditions.png", "unsafe rate per condition and model (95% Wilson intervals)")
    comparison = b.load("comparison.json")
    if comparison:
        b.note("**Paired comparison, ReGap minus plain** (same requests and images; Newcombe interval, exact McNemar):")
        b.table(["condition", "n", "plain", "ReGap", "difference [95% CI]", "McNemar p"],
                [[r["condition"], r["n"], r["rate_a"], r["rate_b"],
                  f"{r['difference_b_minus_a']['difference']:+.3f} [{r['difference_b_minus_a']['ci_low']:+.3f}, "
                  f"{r['difference_b_minus_a']['ci_high']:+.3f}]", f"{r['mcnemar']['p_value']:.3g}"] for r in comparison])


def _correlation(b: ReportBuilder) -> None:
    b.heading("Gap vs safety across checkpoints and lambda values")
    result = b.load("correlate/correlation.json")
    if result and "undefined" in result:
        b.note(f"Correlation undefined: {_md(result['undefined'])}.")
        b.table(["run", "MIR", "layer-0 gap", "unsafe rate (image conditions)"],
                [[p["label"], p["mir"], p["layer0_gap"], p["unsafe_rate"]] for p in result["points"]])
    elif result:
        b.note(f"Pearson r = {result['pearson']['r']:.3f} (95% CI {_cell(result['pearson']['ci'])}, "
               f"p = {result['pearson']['p_value']:.3g}); Spearman rho = {result['spearman']['rho']:.3f} "
               f"(95% CI {_cell(result['spearman']['ci'])}) over {result['n_points']} runs.")
        b.table(["run", "MIR", "layer-0 gap", "unsafe rate (image conditions)"],
                [[p["label"], p["mir"], p["layer0_gap"], p["unsafe_rate"]] for p in result["points"]])
    b.figure("correlate/correlation.png", "MIR vs unsafe rate")


def _defenses(b: ReportBuilder) -> None:
    b.heading("Defense stack")
    rows = []
    for variant in b.variants():
        for name in sorted(p.name for p in (b.folder() / "eval" / variant).glob("safety-*")):
            summary = b.load(f"eval/{variant}/{name}/summary.json")
            base = b.load(f"eval/{variant}/safety/summary.json")
            if not summary or not base:
                continue
            judge = next(iter(summary["judges"]))
            before = {r["condition"]: r["unsafe"]["rate"] for r in base["judges"][judge].get("by_condition", [])}
            for r in summary["judges"][judge].get("by_condition", []):
                over = {o["condition"]: o["rate"] for o in summary["judges"][judge].get("over_refusal", [])}
                rows.append([variant, name.removeprefix("safety-"), r["condition"], before.get(r["condition"], "-"),
                             r["unsafe"]["rate"], over.get(r["condition"], "-")])
    if rows:
        b.table(["model", "defense", "condition", "unsafe without", "unsafe with", "over-refusal with"], rows)
    else:
        b.note("No defense runs found (`eval/*/safety-*/summary.json`).")


def _utility(b: ReportBuilder) -> None:
    b.heading("Utility")
    rows = []
    for variant in b.variants():
        utility = b.load(f"eval/{variant}/utility/utility.json")
        if utility:
            for task, entry in utility.get("tasks", {}).items():
                rows.append([variant, task, entry.get("score"), entry.get("ci", "-"), entry.get("n")])
    if rows:
        b.table(["model", "task", "score", "95% CI", "n"], rows)


def _judge(b: ReportBuilder) -> None:
    b.heading("Judge validation")
    result = b.load("judge_validation.json", expected=bool(b.settings().get("xstest")))  # made with --xstest only
    if result:
        overall = result.get("overall", result)
        b.table(["metric", "value"], [[k, v] for k, v in overall.items() if isinstance(v, (int, float))])


SECTIONS = (_setup, _training, _gap, _safety, _correlation, _defenses, _utility, _judge)


def present_families(root: Path) -> list[tuple[str, str, str]]:
    """The families with results in `root` (see FAMILIES); the root's own run when there are none,
    so a partial folder still gets today's report naming what is missing."""
    found = [family for family in FAMILIES
             if (root / family[1] / "eval").is_dir() or (root / family[1] / "summary.json").is_file()]
    return found or [FAMILIES[0]]


def _final_variants(b: ReportBuilder) -> dict[str, str]:
    """Each run label's last checkpoint (`plain@24` over `plain@12`), in lambda order."""
    final: dict[str, tuple[int, str]] = {}
    for variant in b.variants():
        label, _, step = variant.rpartition("@")
        if not label or not step.isdigit():
            label, step = variant, "0"
        if label not in final or int(step) > final[label][0]:
            final[label] = (int(step), variant)
    return {label: final[label][1] for label in sorted(final, key=_lambda_order)}


def _lambda_order(label: str) -> tuple[float, str]:
    if label == "plain":
        return (0.0, label)
    try:
        return (float(label.removeprefix("regap-l")), label)
    except ValueError:
        return (float("inf"), label)


def _family_column(b: ReportBuilder) -> dict[tuple[str, str], str]:
    """(run label, metric) -> cell text, from the family's final checkpoints."""
    cells: dict[tuple[str, str], str] = {}
    for label, variant in _final_variants(b).items():
        gap = b.load(f"eval/{variant}/gap/gap.json")
        if gap:
            ci = gap.get("mir_ci")
            cells[(label, "MIR [95% CI]")] = f"{gap['mir']:.3f}" + (f" {_cell(ci)}" if ci else "")
            cells[(label, "layer-0 gap")] = f"{gap['layer0_gap']:.3g}"
        safety = b.load(f"eval/{variant}/safety/summary.json")
        if safety and safety.get("judges"):
            judge, entry = next(iter(safety["judges"].items()))
            for row in entry.get("by_condition", []):
                cells[(label, f"unsafe rate: {row['condition']} ({judge})")] = f"{row['unsafe']['rate']:.3f}"
    return cells


def _side_by_side(root: Path, families: list[tuple[str, str, str]], builder: ReportBuilder) -> None:
    """One table with a column per family (final checkpoint per lambda), then both families' figures."""
    builders = [ReportBuilder(root, base=folder + "/" if folder else "") for _, folder, _ in families]
    titles = []
    for (_, _, title), b in zip(families, builders):
        setup = (b.load("summary.json") or {}).get("setup", {})
        titles.append(f"{title} ({_code(setup['model'], in_table=True)})" if setup.get("model") else title)
    columns = [_family_column(b) for b in builders]
    builder.heading("Connector families side by side")
    builder.note("The same study (data, seed, lambda sweep, requests) on each connector family; each cell is the "
                 "run's final checkpoint. Per-family details follow below.")
    keys: list[tuple[str, str]] = []
    for column in columns:
        keys += [k for k in column if k not in keys]
    labels = sorted({label for label, _ in keys}, key=_lambda_order)
    rows = [[label, metric, *[column.get((label, metric), "-") for column in columns]]
            for label in labels for metric in [m for lab, m in keys if lab == label]]
    if rows:
        builder.table(["run", "metric", *titles], rows)
    else:
        builder.note("No evaluated checkpoints found in either family.")
    builder.note("**Figures** (one column per family):")
    header = "| figure | " + " | ".join(titles) + " |"
    builder.lines += [header, "|" + "---|" * (len(titles) + 1)]
    for relative, caption in FAMILY_FIGURES:
        cells = []
        for b in builders:
            path = root / (b.base + relative)
            if path.exists():
                builder.figures.append(path)
                cells.append(f"![{caption}]({b.base + relative})")
            else:
                builder.missing.append(b.base + relative)
                cells.append(f"*missing: `{b.base + relative}`*")
        builder.lines.append(f"| {caption} | " + " | ".join(cells) + " |")
    builder.lines.append("")
    for b in builders:
        builder.missing += b.missing


def run_kind(root: Path) -> str | None:
    """'study' (a `regap study` results folder), 'demo' (a `regap demo` run) or None (no regap run)."""
    summary = _read_summary(root / "summary.json")
    if isinstance(summary, dict) and "study" in summary and "units_planned" in summary and (root / "units").is_dir():
        return "study"
    for _, folder, _ in FAMILIES:
        family = root / folder
        family_summary = summary if not folder else _read_summary(family / "summary.json")
        if (family / "eval").is_dir() or (isinstance(family_summary, dict) and "setup" in family_summary):
            return "demo"
    return None


def _read_summary(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None


def build_report(root: str | Path) -> dict[str, Any]:
    """Write a demo run's `report.md` and `report.html` into `root`; returns what was missing."""
    root = Path(root)
    if not root.is_dir():
        raise RegapError(f"run folder not found: {root}")
    check_reports_overwritable(root)
    families = present_families(root)
    builder = ReportBuilder(root)
    builder.lines.append(f"# regap report: {_code(root.name)}\n")
    if len(families) > 1:
        _side_by_side(root, families, builder)
    for _, folder, title in families:
        builder.base = folder + "/" if folder else ""
        builder.title = f"{title}: " if len(families) > 1 or folder else ""
        builder.inline_figures = len(families) == 1
        for section in SECTIONS:
            section(builder)
    missing = sorted(set(builder.missing))
    builder.title = ""  # the missing files are the whole run's
    if missing:
        builder.heading("Missing files")
        builder.note("These files were not found; the sections above that need them are incomplete:")
        for item in missing:
            builder.note(f"- {_code(item)}")
    write_reports(root, "\n".join(builder.lines), builder.root.name)
    return {"missing": missing, "figures": [str(p.relative_to(root)) for p in builder.figures]}
