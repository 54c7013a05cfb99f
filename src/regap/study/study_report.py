"""The study's report (`OUT/report.md`, `OUT/report.html`) and figures (`OUT/figures/`), written
from `summary.json` and the unit summaries only, so `regap study --no-run` rebuilds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from regap.study.plots import _pyplot
from regap.study.units import describe_variant, gap_closing, is_defended

FIGURES = ("learning_curve.png", "unsafe_by_arm.png", "gap_by_arm.png", "training_vs_inference.png", "frontier.png")


def _fmt(entry: dict[str, Any] | None, signed: bool = False) -> str:
    if not entry:
        return "–"
    sign = "+" if signed else ""
    if entry.get("ci") is None:
        return f"{entry['mean']:{sign}.3f} (1 seed: no interval)"
    text = f"{entry['mean']:{sign}.3f} [{entry['ci'][0]:{sign}.3f}, {entry['ci'][1]:{sign}.3f}]"
    if entry.get("p_value") is not None:
        text += f" p={entry['p_value']:.3f}"
    return text


def _err(entry: dict[str, Any]) -> tuple[float, float]:
    """Error-bar lengths below and above the mean (none with one seed: no interval)."""
    if entry.get("ci") is None:
        return 0.0, 0.0
    return entry["mean"] - entry["ci"][0], entry["ci"][1] - entry["mean"]


def _seeds(entry: dict[str, Any] | None) -> str:
    """` (per seed +a, +b)` when the entry has one mean per seed and more than one seed."""
    means = (entry or {}).get("seed_means") or []
    return f" (per seed {', '.join(f'{m:+.3f}' for m in means)})" if len(means) > 1 else ""


def _ratio(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "–"
    ci = entry.get("ci")
    seeds = f"{entry['n_seeds']} seed" + ("" if entry["n_seeds"] == 1 else "s")
    return f"×{entry['ratio']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "") + f" ({seeds})"


def per_seed_table(vs_plain: dict[str, Any], shown: list[str]) -> list[str]:
    """Each arm's difference from plain seed by seed (mean over requests): with few seeds the pooled
    interval hides whether the seeds agree, and a reader should see it when they do not."""
    lines = ["", "### The same differences seed by seed (mean over requests)", "",
             "| arm | seed | " + " | ".join(shown) + " | QA accuracy |", "|---|---|" + "---|" * (len(shown) + 1)]
    for arm, diff in vs_plain.items():
        by_seed = [dict(zip(e["seeds"], e["seed_means"])) if e else {} for e in
                   [diff["unsafe"].get(c) for c in shown] + [diff.get("qa")]]
        for seed in sorted(set().union(*by_seed)):
            cells = [f"{means[seed]:+.3f}" if seed in means else "–" for means in by_seed]
            lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
    return lines


def plot_learning_curves(curves: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    for unit, curve in sorted(curves.items()):
        offset = 0
        for stage in ("stage1", "stage2"):
            data = curve.get(stage, {})
            qa = data.get("qa", [])
            loss = data.get("loss", [])
            if qa:
                axes[0].plot([offset + p["step"] for p in qa], [p["qa"] for p in qa], marker="o",
                             label=f"{unit} {stage}")
            if loss:
                axes[1].plot([offset + p["step"] for p in loss], [p["loss"] for p in loss], alpha=0.7,
                             label=f"{unit} {stage}")
            offset += max([p["step"] for p in loss] or [p["step"] for p in qa] or [0])
    axes[0].axhline(0.6, color="gray", linestyle="--", linewidth=1)
    axes[0].set_title("held-out synthetic QA accuracy (dashed: the 0.6 bar)")
    axes[1].set_title("training loss (stage 1: captions; stage 2: answers)")
    for axis in axes:
        axis.set_xlabel("optimizer step (stage 2 after stage 1)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_unsafe(results: dict[str, Any], conditions: list[str], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    arms = list(results["arms"])
    figure, axis = plt.subplots(figsize=(max(8, 1.4 * len(conditions) * len(arms) / 3), 4.5), constrained_layout=True)
    width = 0.8 / max(1, len(arms))
    shown = [c for c in conditions if c != "backbone"]
    for k, arm in enumerate(arms):
        xs, ys, lo, hi = [], [], [], []
        for i, condition in enumerate(shown):
            entry = results["arms"][arm]["unsafe"].get(condition)
            if entry:
                xs.append(i + k * width)
                ys.append(entry["mean"])
                lo.append(_err(entry)[0])
                hi.append(_err(entry)[1])
        axis.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=arm)
    if "backbone" in results:
        axis.axhline(results["backbone"]["unsafe"], color="black", linestyle=":", label="backbone LLM (text)")
    axis.set_xticks(np.arange(len(shown)) + 0.4 - width / 2, shown)
    axis.set_ylabel("unsafe rate (harmful requests)")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=7, ncol=3)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_gap(gap: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    arms = list(gap)
    for metric, axis in zip(("layer0_gap", "mir"), axes):
        for i, arm in enumerate(arms):
            for kind, marker, shift in (("gap_stage1", "s", -0.15), ("gap", "o", 0.0), ("gap_attack", "^", 0.15)):
                values = gap[arm].get(kind, {}).get(metric)
                if values:
                    axis.scatter([i + shift] * len(values), values, marker=marker, color=f"C{('gap_stage1', 'gap', 'gap_attack').index(kind)}",
                                 label={"gap_stage1": "after stage 1", "gap": "after stage 2",
                                        "gap_attack": "attack inputs (stage 2)"}[kind] if i == 0 else None)
        axis.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
        axis.set_title("layer-0 gap" if metric == "layer0_gap" else "MIR")
        if metric == "layer0_gap":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_training_vs_inference(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    arms = list(results["arms"])
    figure, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    panels = (("unsafe, image conditions pooled", lambda a: results["arms"][a]["unsafe"].get("image (pooled)")),
              ("over-refusal, benign, image conditions", lambda a: results["arms"][a]["over_refusal"].get("image (pooled)")),
              ("held-out QA accuracy", lambda a: results["arms"][a].get("qa")))
    for axis, (title, get) in zip(axes, panels):
        for i, arm in enumerate(arms):
            entry = get(arm)
            if entry:
                axis.errorbar([i], [entry["mean"]], yerr=[[_err(entry)[0]], [_err(entry)[1]]],
                              fmt="o", capsize=3, color="C1" if is_defended(arm) else "C0")
        axis.set_xticks(range(len(arms)), arms, rotation=30, fontsize=7, ha="right")
        axis.set_title(title + "\n(blue: trained arms, orange: + inference-time defense)", fontsize=9)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def side_by_side(results: dict[str, Any]) -> list[str]:
    """Training-time (ReGap, MoCa) against inference-time (CMRM, layer0-align) gap closing, one row per arm:
    the gap it leaves, what it does to the unsafe rate under images, and what it costs."""
    lines = ["", "## Training-time against inference-time gap closing, side by side", "",
             "Image conditions pooled; *unsafe* and *refused* on harmful requests, *over-refusal* on benign ones; "
             "differences paired by seed and request. *vs undefended*: the same trained "
             "model without the inference-time defense.", "",
             "| arm | how the gap is closed | layer-0 gap | MIR | unsafe | vs plain | vs undefended | refused | "
             "over-refusal | QA accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, entry in results["arms"].items():
        gap = results["gap"].get(arm, {}).get("gap", {})
        vs_plain = results["vs_plain"].get(arm, {})
        vs_undefended = results.get("vs_undefended", {}).get(arm, {})
        cells = [", ".join(f"{x:.3g}" for x in gap.get(m) or []) or "–" for m in ("layer0_gap", "mir")]
        lines.append(f"| {arm} | {gap_closing(arm)} | {cells[0]} | {cells[1]} | "
                     f"{_fmt(entry['unsafe'].get('image (pooled)'))} | "
                     f"{_fmt(vs_plain.get('unsafe', {}).get('image (pooled)'), True)} | "
                     f"{_fmt(vs_undefended.get('unsafe', {}).get('image (pooled)'), True)} | "
                     f"{_fmt(entry['refused'].get('image (pooled)'))} | "
                     f"{_fmt(entry['over_refusal'].get('image (pooled)'))} | {_fmt(entry.get('qa'))} |")
    return lines


def ablation_lines(results: dict[str, Any]) -> list[str]:
    """Exploratory: each ablation next to the main ReGap arm at its λ, with both differences (− plain and
    − the main arm, per-seed paired, t interval over the seeds the two share)."""
    found = results.get("ablations") or {}
    if not found:
        return []
    lines = ["", "## Exploratory: ablations", "",
             "Each arm below is the main ReGap arm at the same λ with one setting changed, as in the ReGap paper's "
             "ablations: a later LLM layer (block k's output instead of the input embeddings), ReGap in stage 2 "
             "instead of stage 1 (its stage 1 is plain's of the same seed), or another distance. They are "
             "exploratory: outside any pre-registered family, claims (b)-(d) and the choice of λ. Image conditions "
             "pooled; differences paired by seed and request, 95 % t interval over the seeds the two arms share.", "",
             "| arm | what it changes | layer-0 gap after stage 2 | × plain | unsafe | − plain | − main arm | "
             "QA accuracy | QA − plain | QA − main arm |", "|---|---|---|---|---|---|---|---|---|---|"]
    shown: set[str] = set()
    for arm, entry in found.items():
        main = entry["main"]
        rows = ([] if main in shown else [(main, "the main ReGap arm (layer 0, stage 1, centroid)", None)]) + \
            [(arm, describe_variant(entry["variant"]), entry["vs_main"] or {})]
        shown.add(main)
        for name, what, vs_main in rows:
            own = results["arms"].get(name)
            if own is None:
                lines.append(f"| {name} | {what} | not trained in this study | | | | | | | |")
                continue
            gap = results["gap"].get(name, {}).get("gap", {})
            vs_plain = results["vs_plain"].get(name, {})
            main_cells = ["–", "–"] if vs_main is None else [
                _fmt(vs_main.get("unsafe", {}).get("image (pooled)"), True), _fmt(vs_main.get("qa"), True)]
            lines.append(f"| {name} | {what} | {', '.join(f'{x:.3g}' for x in gap.get('layer0_gap') or []) or '–'} | "
                         f"{_ratio((gap.get('ratio_vs_plain') or {}).get('layer0_gap'))} | "
                         f"{_fmt(own['unsafe'].get('image (pooled)'))} | "
                         f"{_fmt(vs_plain.get('unsafe', {}).get('image (pooled)'), True)} | {main_cells[0]} | "
                         f"{_fmt(own.get('qa'))} | {_fmt(vs_plain.get('qa'), True)} | {main_cells[1]} |")
    return lines + [""]


def primary_lines(summary: dict[str, Any]) -> list[str]:
    """The pre-registered primary endpoints first; everything after them is exploratory."""
    registered = summary.get("preregistration")
    primary = summary["results"].get("primary")
    if registered is None or primary is None:
        return ["**Exploratory.** This study has no pre-registration: every interval and p-value below is "
                "descriptive, not a confirmatory test.", ""]
    lines = ["## Primary endpoints (pre-registered)", "",
             f"Pre-registration `{registered['path']}` (sha256 `{registered['sha256'][:16]}`). Per-seed paired "
             f"differences, 95 % t interval over seeds, p-values Holm-adjusted over {primary['family']}.", "",
             "| endpoint | question | seeds | per seed | estimate [95 % CI] | p | p (Holm) |",
             "|---|---|---|---|---|---|---|"]
    for key, e in primary["endpoints"].items():
        per_seed = ", ".join(f"{v:+.3f}" for v in e["per_seed"]) or "–"
        ci = "–" if e["ci"] is None else f"[{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}]"
        estimate = "–" if e["mean"] is None else f"{e['mean']:+.3f} {ci}"
        p = "–" if e["p_value"] is None else f"{e['p_value']:.4f}"
        ph = "–" if e["p_holm"] is None else f"{e['p_holm']:.4f}"
        lines.append(f"| {key} | {e['question']} | {len(e['seeds'])} | {per_seed} | {estimate} | {p} | {ph} |")
    return lines + ["", "Everything below the primary endpoints is **exploratory** (not pre-registered, not "
                        "adjusted for multiple comparisons).", ""]


def best_lambda_lines(choice: dict[str, Any] | None) -> list[str]:
    """The λ the rule picks to ship, with every candidate's numbers (`regap.study.selection`)."""
    if not choice:
        return []
    state = "decided" if choice["decided"] else f"not decided yet: waiting for every seed of {', '.join(choice['waiting_for'])}"
    lines = [f"**Which λ to ship** ({state}; exploratory: the rule was written after the first λ results it "
             f"uses, see `regap.study.selection`). Rule: {choice['rule']}. Choice: **{choice['arm']}**; {choice['reason']}.", "",
             "| arm | seeds | unsafe, image pooled, − plain | below zero | QA |", "|---|---|---|---|---|"]
    for arm, c in choice["candidates"].items():
        diff = c["unsafe_image_vs_plain"]
        shown = _fmt(diff, True)
        qa = "–" if c["qa"] is None else f"{c['qa']:.3f}"
        lines.append(f"| {arm} | {', '.join(map(str, c['seeds']))} | {shown} | {'yes' if c['lowers_unsafe'] else 'no'} | {qa} |")
    return lines + [""]


def safety_measured(results: dict[str, Any]) -> bool:
    """Whether any arm has an unsafe rate: a utility-side check (`evaluations: [gap, utility]`) has none,
    and its report shows QA and the gap only."""
    return any(any(entry.get("unsafe", {}).values()) for entry in results["arms"].values())


def safety_lines(results: dict[str, Any], conditions: list[str]) -> list[str]:
    """The unsafe, refusal and over-refusal tables per arm and condition, with the paired differences."""
    evaluated = [c for c in conditions if c != "backbone"]
    shown = evaluated + ["image (pooled)"]
    lines = ["## Unsafe rate on harmful requests (mean of the per-seed rates, 95 % t interval over seeds)", "",
             "| arm | seeds | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    for arm, entry in results["arms"].items():
        seeds = len((entry["unsafe"].get("text") or next(iter(v for v in entry["unsafe"].values() if v), {})).get("seeds", []))
        lines.append(f"| {arm} | {seeds} | " + " | ".join(_fmt(entry["unsafe"].get(c)) for c in shown) + " |")
    if "backbone" in results:
        lines += ["", f"Backbone LLM (before stage 2, text only): unsafe rate {results['backbone']['unsafe']:.3f} "
                      f"(n = {results['backbone']['n']})."]
    lines += ["", "## Compared with plain (per-seed paired differences; 95 % t interval over seeds, p: two-sided t-test)", "",
              "| arm | " + " | ".join(shown) + " | QA accuracy |", "|---|" + "---|" * (len(shown) + 1)]
    for arm, diff in results["vs_plain"].items():
        lines.append(f"| {arm} | " + " | ".join(_fmt(diff["unsafe"].get(c), True) for c in shown) +
                     f" | {_fmt(diff.get('qa'), True)} |")
    lines += per_seed_table(results["vs_plain"], shown)
    lines += ["", "## Refusal rate on harmful requests (the judge's refusal verdict)", "",
              "| arm | " + " | ".join(evaluated) + " |", "|---|" + "---|" * len(evaluated)]
    for arm, entry in results["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(_fmt(entry["refused"].get(c)) for c in evaluated) + " |")
    lines += ["", "## Over-refusal on benign requests and utility", "",
              "| arm | " + " | ".join(evaluated) + " | QA accuracy |", "|---|" + "---|" * (len(evaluated) + 1)]
    for arm, entry in results["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(_fmt(entry["over_refusal"].get(c)) for c in evaluated)
                     + f" | {_fmt(entry.get('qa'))} |")
    return lines


def judge_lines(agreement: dict[str, Any]) -> list[str]:
    """How often the judges agree on the study's harmful-request answers."""
    lines = ["## Judges", "", "Unsafe rate on harmful requests over all responses of the study, per judge: " +
             ", ".join(f"{j} {r:.3f}" for j, r in agreement["unsafe_rate"].items() if r is not None) + ".", "",
             "| judge A | judge B | n | agreement | Cohen's κ |", "|---|---|---|---|---|"]
    for pair in agreement["pairs"]:
        kappa, share = pair["kappa"], pair["agreement"]
        lines.append(f"| {pair['judge_a']} | {pair['judge_b']} | {pair['n']} | "
                     f"{'–' if share is None else f'{share:.3f}'} | "
                     f"{'–' if kappa is None or kappa != kappa else f'{kappa:.3f}'} |")
    return lines


def write_report(out: Path, summary: dict[str, Any], units: list[dict[str, Any]]) -> None:
    from regap.report.html import render_html

    figures = draw_figures(out, summary)
    results, config = summary["results"], summary["config"]
    conditions = config["safety"]["conditions"]
    measured = safety_measured(results)
    lines = [f"# regap study `{summary['study']}`", "",
             f"Model `{config['model']}`, dtype {summary['dtype']}, seeds {results['seeds']}"
             + (f", judge `{summary['primary_judge']}` (others below)" if measured else "")
             + f". {len(summary['units'])} of "
             f"{len(summary['units_planned'])} planned units present.", ""]
    lines += primary_lines(summary)
    if results.get("ablations"):
        lines += [f"Arms named `regap-l<λ>@...` ({', '.join(results['ablations'])}) are exploratory ReGap ablations: "
                  "see \"Exploratory: ablations\".", ""]
    if summary["notes"]:
        lines += ["**Notes**", ""] + [f"* {n}" for n in summary["notes"]] + [""]
    if measured:
        lines += safety_lines(results, conditions)
    else:
        lines += ["Safety was not measured in this study (its evaluations: "
                  f"{', '.join(config.get('evaluations') or [])}): held-out QA and the gap only.", "",
                  "## Held-out QA accuracy (mean of the per-seed accuracies, 95 % t interval over seeds)", "",
                  "| arm | QA accuracy | − plain (per-seed paired) |", "|---|---|---|"]
        for arm, entry in results["arms"].items():
            diff = results["vs_plain"].get(arm, {}).get("qa")
            lines.append(f"| {arm} | {_fmt(entry.get('qa'))} | {'–' if arm == 'plain' else _fmt(diff, True)} |")
    lines += ["", "## The gap (per seed) and its ratio to plain", "",
              "| arm | layer-0 gap after stage 1 | after stage 2 | attack inputs | MIR after stage 2 | layer-0 ratio vs plain | MIR ratio vs plain |",
              "|---|---|---|---|---|---|---|"]
    for arm, kinds in results["gap"].items():
        def values(kind: str, metric: str) -> str:
            v = kinds.get(kind, {}).get(metric)
            return ", ".join(f"{x:.3g}" for x in v) if v else "–"
        ratio = kinds.get("gap", {}).get("ratio_vs_plain", {})
        lines.append(f"| {arm} | {values('gap_stage1', 'layer0_gap')} | {values('gap', 'layer0_gap')} | "
                     f"{values('gap_attack', 'layer0_gap')} | {values('gap', 'mir')} | {_ratio(ratio.get('layer0_gap'))} | "
                     f"{_ratio(ratio.get('mir'))} |")
    if measured:
        lines += side_by_side(results)
        if summary.get("frontier"):
            lines += frontier_lines(results, summary["frontier"])
        lines += ablation_lines(results)
        lines += claims_lines(summary)
        lines += judge_lines(summary["judge_agreement"])
    lines += ["", "## Time per unit (minutes)", "", ", ".join(f"{u} {m}" for u, m in summary["timings_minutes"].items()), ""]
    shown_above = {"frontier.png"}  # the frontier section carries its own figure
    lines += ["## Figures", ""] + [f"![{name}](figures/{name})" for name in FIGURES
                                   if (figures / name).exists() and name not in shown_above]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(render_html(text, out, f"study {summary['study']}"))


def claims_lines(summary: dict[str, Any]) -> list[str]:
    """The paper's four claims under the main judge, the λ choice, and the claims under the other judges."""
    results = summary["results"]
    lines: list[str] = []
    claims = results["claims"]
    lines += ["", "## The paper's four claims", ""]
    a = claims["a_image_raises_unsafe"]
    lines += [f"**(a)** {a['question']} image − text: {_fmt(a['image_minus_text'], True)}{_seeds(a['image_minus_text'])}; "
              f"image − backbone: {_fmt(a['image_minus_backbone'], True)}{_seeds(a['image_minus_backbone'])}.", ""]
    for key in ("b_regap_lowers_gap", "c_regap_lowers_unsafe", "d_utility_holds"):
        claim = claims[key]
        parts = []
        for arm, value in claim.items():
            if arm == "question":
                continue
            if key == "b_regap_lowers_gap":
                parts.append(f"{arm}: layer-0 {_ratio((value or {}).get('layer0_gap'))}, MIR {_ratio((value or {}).get('mir'))}")
            elif key == "d_utility_holds":
                parts.append(f"{arm}: QA {_fmt((value or {}).get('qa'), True)}{_seeds((value or {}).get('qa'))}, over-refusal (text) "
                             f"{_fmt((value or {}).get('over_refusal_text'), True)}")
            else:
                parts.append(f"{arm}: {_fmt(value, True)}{_seeds(value)}")
        lines += [f"**({key[0]})** {claim['question']} " + "; ".join(parts) + ".", ""]
    lines += best_lambda_lines(summary.get("best_lambda"))
    for judge, other in summary.get("other_judges", {}).items():
        a, c = other["claims"]["a_image_raises_unsafe"], other["claims"]["c_regap_lowers_unsafe"]
        parts = [f"{arm}: {_fmt(value, True)}{_seeds(value)}" for arm, value in c.items() if arm != "question"]
        lines += [f"Under `{judge}`: (a) image − text {_fmt(a['image_minus_text'], True)}, image − backbone "
                  f"{_fmt(a['image_minus_backbone'], True)}; (c) " + ("; ".join(parts) or "–") + ".", ""]
    return lines


def draw_figures(out: Path, summary: dict[str, Any]) -> Path:
    """Every figure of the report into `OUT/figures` (returned)."""
    from regap.study.frontier import plot_frontier

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure this summary does not draw must not linger from an earlier one
        (figures / name).unlink(missing_ok=True)
    results = summary["results"]
    if summary["curves"]:
        plot_learning_curves(summary["curves"], figures / FIGURES[0])
    plot_gap(results["gap"], figures / FIGURES[2])
    if safety_measured(results):
        plot_unsafe(results, summary["config"]["safety"]["conditions"], figures / FIGURES[1])
        plot_training_vs_inference(results, figures / FIGURES[3])
        plot_frontier(results, figures / FIGURES[4])
    return figures


def _measured_or_not(entry: dict[str, Any] | None) -> str:
    """A rate with its interval, or "not measured" (XSTest is measured only where `safety.xstest` is set)."""
    return "not measured" if entry is None else _fmt(entry)


def frontier_lines(results: dict[str, Any], choice: dict[str, Any]) -> list[str]:
    """The table behind the figure and the recommended setting per method."""
    from regap.study.frontier import frontier_table

    rows = frontier_table(results)
    lines = ["", "## The safety–utility frontier", "", "![frontier](figures/frontier.png)", "",
             "| method | strength | arm | QA | unsafe (image pooled) | − plain | refused | over-refusal (benign, "
             "image pooled) | over-refusal (benign, text) | over-refusal (XSTest safe, image pooled) | over-refusal "
             "(XSTest safe, text) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"] != "plain", r["method"], r["strength"] or 0.0)):
        strength = "–" if r["strength"] is None else f"{r['strength']:g}"
        lines.append(f"| {r['method']} | {strength} | {r['arm']} | {_fmt(r['qa'])} | {_fmt(r['unsafe'])} | "
                     f"{_fmt(r['unsafe_vs_plain'], True)} | {_fmt(r['refused'])} | {_fmt(r['over_refusal'])} | "
                     f"{_fmt(r['over_refusal_text'])} | {_measured_or_not(r['xstest_over_refusal'])} | "
                     f"{_measured_or_not(r['xstest_over_refusal_text'])} |")
    lines += ["", f"**Recommended setting per method.** Rule: {choice['rule']}.", "",
              "| method | " + " | ".join(f"QA loss bound {b}" for b in choice["by_bound"]) + " |",
              "|---|" + "---|" * len(choice["by_bound"])]
    methods = sorted({m for by in choice["by_bound"].values() for m in by})
    for method in methods:
        cells = []
        for by in choice["by_bound"].values():
            pick = by.get(method, {})
            cells.append("none" if not pick.get("arm") else
                         f"{pick['arm']} (−{pick['unsafe_reduction']:.3f} unsafe)")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]
