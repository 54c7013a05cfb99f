"""The safety–utility frontier: every gap-closing method at every strength the study ran, on one figure.

A user's question is "which method, at which setting, buys the most safety for the utility I can
spare?". Each arm of a study is a point: x its held-out QA accuracy, y its unsafe rate on harmful
requests pooled over the image conditions (a second panel: its refusal rate), both with t intervals
over seeds. Arms of one method (ReGap at each λ, CMRM at each α, layer0-align at each strength, a
stack) form a curve in order of strength; plain, its text-only rate and the backbone LLM are reference
marks. `recommend` applies a stated rule per method to the same table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from regap.study.units import ablation_of, arm_lambda, split_arm

#: The QA-loss bounds of the recommendation rule: the seed-level interval of QA − plain must lie above each.
QA_LOSS_BOUNDS = (-0.02, -0.05)
RULE = ("per method, the setting with the largest pooled-image unsafe-rate reduction against plain whose "
        "QA difference from plain has a seed-level 95 % interval entirely above the bound; none: no setting "
        "qualifies")


def method_and_strength(arm: str) -> tuple[str, float | None]:
    """(method, strength) of an arm: `regap-l0.001` -> (regap, 0.001), `plain+cmrm:alpha=0.1` ->
    (cmrm, 0.1), `regap-l0.001+cmrm:alpha=0.1` -> (regap-l0.001 + cmrm, 0.1), `plain+ecso` -> (ecso, None);
    plain and MoCa are their own methods, and so is each ReGap ablation (`regap-l0.1@layer6` -> (regap@layer6, 0.1)),
    so that it never joins the main ReGap arms' curve."""
    ablation = ablation_of(arm)
    if ablation is not None:
        return f"regap@{split_arm(arm)[1]}", ablation[0]
    trained, _, defense = split_arm(arm)
    lam = arm_lambda(trained)
    if not defense:
        return ("regap", lam) if lam is not None else (trained, None)
    name = defense.split(":", 1)[0]
    fixed = sorted(part for part in defense.split(":")[1:] if not _is_strength(part))
    method = name + ("[" + ", ".join(fixed) + "]" if fixed else "")
    if trained != "plain":
        method = f"{trained} + {method}"
    strengths = [float(m.group(1)) for part in defense.split(":")[1:] if (m := _strength(part))]
    return method, strengths[0] if strengths else None


def _strength(part: str) -> re.Match[str] | None:
    return re.fullmatch(r"(?:alpha|strength)=([-+0-9.eE]+)", part)


def _is_strength(part: str) -> bool:
    return _strength(part) is not None


def frontier_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm: method, strength, QA, unsafe and refused (image conditions pooled), over-refusal,
    and the differences from plain, all with their seed-level intervals."""
    rows = []
    for arm, entry in results["arms"].items():
        method, strength = method_and_strength(arm)
        diff = results.get("vs_plain", {}).get(arm, {})
        rows.append({"arm": arm, "method": method, "strength": strength, "qa": entry.get("qa"),
                     "unsafe": entry["unsafe"].get("image (pooled)"), "refused": entry["refused"].get("image (pooled)"),
                     "over_refusal": entry["over_refusal"].get("image (pooled)"),
                     "over_refusal_text": entry["over_refusal"].get("text"),
                     "xstest_over_refusal": entry.get("xstest_over_refusal", {}).get("image (pooled)"),
                     "xstest_over_refusal_text": entry.get("xstest_over_refusal", {}).get("text"),
                     "unsafe_vs_plain": diff.get("unsafe", {}).get("image (pooled)"), "qa_vs_plain": diff.get("qa")})
    return rows


def recommend(rows: list[dict[str, Any]], bound: float) -> dict[str, dict[str, Any]]:
    """Per method, by `RULE` at the QA-loss `bound`: the recommended arm, or None ("none")."""
    out: dict[str, dict[str, Any]] = {}
    for method in sorted({r["method"] for r in rows if r["method"] != "plain"}):
        qualifying = []
        for r in rows:
            if r["method"] != method or not r["unsafe_vs_plain"] or not r["qa_vs_plain"]:
                continue
            ci = r["qa_vs_plain"].get("ci")
            if ci is not None and ci[0] > bound:
                qualifying.append(r)
        best = max(qualifying, key=lambda r: -r["unsafe_vs_plain"]["mean"], default=None)
        out[method] = {"arm": best["arm"] if best else None, "strength": best["strength"] if best else None,
                       "unsafe_reduction": -best["unsafe_vs_plain"]["mean"] if best else None,
                       "qa_vs_plain": best["qa_vs_plain"] if best else None,
                       "considered": sorted(r["arm"] for r in rows if r["method"] == method)}
    return out


def recommendations(results: dict[str, Any]) -> dict[str, Any]:
    rows = frontier_table(results)
    return {"rule": RULE, "by_bound": {f"{bound:+.2f}": recommend(rows, bound) for bound in QA_LOSS_BOUNDS}}


def _point(entry: dict[str, Any] | None) -> tuple[float, float, float] | None:
    """(mean, below, above) error-bar lengths; no bar with one seed."""
    if not entry or entry.get("mean") is None:
        return None
    ci = entry.get("ci")
    if ci is None:
        return entry["mean"], 0.0, 0.0
    return entry["mean"], entry["mean"] - ci[0], ci[1] - entry["mean"]


def plot_frontier(results: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """`figures/frontier.png`: QA (x) against unsafe and refusal rates pooled over the image conditions
    (y), one curve per method in order of strength; returns the points drawn (for checking)."""
    from regap.study.plots import _pyplot

    plt = _pyplot()
    rows = frontier_table(results)
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    drawn = []
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "plain", m))
    for k, method in enumerate(methods):
        members = sorted((r for r in rows if r["method"] == method), key=lambda r: (r["strength"] is None,
                                                                                   r["strength"] or 0.0))
        for axis, key in zip(axes, ("unsafe", "refused")):
            points = [(r, _point(r["qa"]), _point(r[key])) for r in members]
            points = [(r, x, y) for r, x, y in points if x is not None and y is not None]
            if not points:
                continue
            xs, ys = [x[0] for _, x, _ in points], [y[0] for _, _, y in points]
            style = {"marker": "s", "markersize": 9, "color": "black"} if method == "plain" else \
                {"marker": "o", "color": f"C{k % 10}"}
            axis.errorbar(xs, ys, xerr=[[x[1] for _, x, _ in points], [x[2] for _, x, _ in points]],
                          yerr=[[y[1] for _, _, y in points], [y[2] for _, _, y in points]], capsize=2,
                          linestyle="-" if len(points) > 1 else "none", label=method, **style)
            for r, x, y in points:
                if r["strength"] is not None:
                    axis.annotate(f"{r['strength']:g}", (x[0], y[0]), textcoords="offset points", xytext=(3, 3),
                                  fontsize=7)
                drawn.append({"arm": r["arm"], "panel": key, "x": x[0], "y": y[0]})
    plain = results["arms"].get("plain", {})
    text = _point(plain.get("unsafe", {}).get("text"))
    qa = _point(plain.get("qa"))
    if text and qa:
        axes[0].scatter([qa[0]], [text[0]], marker="x", s=80, color="black", label="plain, text only", zorder=5)
        drawn.append({"arm": "plain (text only)", "panel": "unsafe", "x": qa[0], "y": text[0]})
    if "backbone" in results:
        axes[0].axhline(results["backbone"]["unsafe"], color="gray", linestyle=":", label="backbone LLM (text only)")
    for axis, title in zip(axes, ("unsafe rate, image conditions pooled", "refusal rate, image conditions pooled")):
        axis.set_xlabel("held-out QA accuracy")
        axis.set_title(title + " (harmful requests; bars: 95 % t intervals over seeds)", fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return drawn
