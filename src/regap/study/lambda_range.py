"""ReGap's working range: stage-1 runs at several λ, summarised side by side (`regap lambda-range`).

Why: λ sets how hard the regulariser pulls image tokens toward the text statistics. Too small and
the gap stays; too large and the projector stops fitting captions. Where between the two a light
regulariser sits is an empirical question per model and recipe, so it is measured, on equal runs
that differ only in λ, before any λ is chosen for a confirmatory study.

Each run folder is a `regap pretrain` output whose `metrics.jsonl` holds the training probe
(`observe.gap_every` / `observe.mir_every`): the layer-0 gap, the image/text norm ratio and MIR on a
fixed probe set. The summary reads them at the last probed step, with the caption loss over the
last `tail` logged steps, and draws each against λ on a log axis (λ = 0 at the left edge)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from regap.errors import RegapError

METRICS = (("probe_gap0", "layer-0 gap (probe)"), ("probe_norm_ratio0", "image / text norm ratio (layer 0)"),
           ("probe_mir", "MIR (probe)"), ("caption_loss", "caption loss"))


def read_run(folder: Path, tail: int = 16) -> dict[str, Any]:
    """λ, steps and the last probe of one stage-1 run folder."""
    import yaml

    config_path, metrics_path = folder / "config.yaml", folder / "metrics.jsonl"
    if not config_path.is_file() or not metrics_path.is_file():
        raise RegapError(f"{folder}: not a regap training run (no config.yaml / metrics.jsonl)")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r for r in rows if isinstance(r.get("step"), int) and "event" not in r]
    if not steps:
        raise RegapError(f"{folder}: no logged training step yet")
    last = steps[-1]["step"]
    out: dict[str, Any] = {"run": folder.name, "lambda": float(config["regap"]["lam"]), "steps": last,
                           "max_steps": config.get("max_steps"), "seed": config.get("seed"),
                           "finished": (folder / "projector.safetensors").is_file()}
    for key in ("probe_gap0", "probe_norm_ratio0", "probe_mir"):
        probed = [r for r in steps if r.get(key) is not None]
        out[key] = probed[-1][key] if probed else None
        out[f"{key}_step"] = probed[-1]["step"] if probed else None
        out[f"{key}_curve"] = [[r["step"], r[key]] for r in probed]
    losses = [r["caption_loss"] for r in steps[-tail:] if r.get("caption_loss") is not None]
    out["caption_loss"] = sum(losses) / len(losses) if losses else None
    out["caption_loss_tail"] = len(losses)
    return out


def summarise(folders: list[Path], tail: int = 16) -> dict[str, Any]:
    """Every run, sorted by λ; runs of another length or seed than the first are flagged."""
    runs = sorted((read_run(f, tail) for f in folders), key=lambda r: r["lambda"])
    if not runs:
        raise RegapError("no run folders given")
    lengths = {r["max_steps"] for r in runs}
    seeds = {r["seed"] for r in runs}
    notes = []
    if len(lengths) > 1 or len(seeds) > 1:
        notes.append(f"the runs differ in length {sorted(lengths)} or seed {sorted(seeds)}: not an equal comparison")
    unfinished = [r["run"] for r in runs if not r["finished"]]
    if unfinished:
        notes.append(f"not finished yet: {', '.join(unfinished)} (their last probe is shown)")
    return {"runs": runs, "tail": tail, "notes": notes}


def plot(summary: dict[str, Any], path: Path) -> None:
    """Each metric against λ (log axis; λ = 0 drawn one decade left of the smallest λ > 0)."""
    from regap.study.plots import _pyplot

    plt = _pyplot()
    runs = summary["runs"]
    positive = [r["lambda"] for r in runs if r["lambda"] > 0]
    zero_at = min(positive) / 10 if positive else 1e-8
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), constrained_layout=True)
    for axis, (key, title) in zip(axes, METRICS):
        points = [(r["lambda"] or zero_at, r[key]) for r in runs if r[key] is not None]
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, marker="o")
            for x, y, r in zip(xs, ys, [r for r in runs if r[key] is not None]):
                if r["lambda"] == 0:
                    axis.annotate("λ=0", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xscale("log")
        if key in ("probe_gap0", "probe_norm_ratio0"):
            axis.set_yscale("log")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("λ")
        axis.grid(alpha=0.3, which="both")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(summary: dict[str, Any]) -> list[str]:
    def fmt(value: float | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"

    lines = ["| λ | steps | layer-0 gap (probe) | image/text norm ratio | MIR (probe) | "
             f"caption loss (last {summary['tail']} steps) |", "|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['lambda']:g} | {r['steps']}/{r['max_steps']} | {fmt(r['probe_gap0'])} | "
                     f"{fmt(r['probe_norm_ratio0'])} | {fmt(r['probe_mir'])} | {fmt(r['caption_loss'])} |")
    return lines


def write(folders: list[Path], out: Path, tail: int = 16) -> dict[str, Any]:
    """`OUT/stage1_sweep.json`, `OUT/stage1_sweep.md` (the table) and `OUT/figures/stage1_sweep.png`."""
    from regap.files import write_json_atomic, write_text_atomic

    summary = summarise(folders, tail)
    if any(r["lambda"] == 0 and r.get("caption_loss") is not None for r in summary["runs"]):
        summary["step1"] = knee(summary)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    plot(summary, out / "figures" / "stage1_sweep.png")
    write_json_atomic(out / "stage1_sweep.json", summary)
    notes = [f"* {n}" for n in summary["notes"]]
    if "step1" in summary:
        step = summary["step1"]
        notes.append(f"* RULE.md step 1: bound {step['bound']:.4g} (1.03 x λ = 0's caption loss); knee λ_k = "
                     f"{step['knee']:g}; candidates {', '.join(f'{c:g}' for c in step['candidates'])}")
    write_text_atomic(out / "stage1_sweep.md", "\n".join(table(summary) + ([""] + notes if notes else [])) + "\n")
    return summary


# ---- results/lambda-range/RULE.md, as code --------------------------------------------------------

#: Step 1: captioning counts as unharmed while the caption loss is at most this multiple of λ = 0's.
CAPTION_BOUND = 1.03
#: The smallest λ the rule considers (the sweep's smallest value > 0).
SMALLEST_LAMBDA = 1e-7
#: Step 2: a candidate keeps utility while its held-out QA is at least plain's minus this (P3's margin).
QA_MARGIN = 0.05


def knee(summary: dict[str, Any], bound: float = CAPTION_BOUND) -> dict[str, Any]:
    """Step 1 of RULE.md on a stage-1 sweep (`summarise`): the knee λ_k, the largest swept λ > 0 whose caption
    loss is at most `bound` x λ = 0's (1e-7 if none), and the three candidates λ_k/100, λ_k/10, λ_k, with
    values below 1e-7 replaced by the next swept values above, so there are always three."""
    runs = [r for r in summary["runs"] if r.get("caption_loss") is not None]
    base = [r["caption_loss"] for r in runs if r["lambda"] == 0]
    if not base:
        raise RegapError("the sweep has no λ = 0 run with a caption loss: the rule's bound needs it")
    limit = bound * base[0]
    swept = sorted(r["lambda"] for r in runs if r["lambda"] > 0)
    within = [r["lambda"] for r in runs if r["lambda"] > 0 and r["caption_loss"] <= limit]
    lam_k = max(within) if within else SMALLEST_LAMBDA
    wanted = [lam_k / 100, lam_k / 10, lam_k]
    candidates = [_swept_value(w, swept) for w in wanted if w >= SMALLEST_LAMBDA * (1 - 1e-9)]
    for value in swept:  # fill from the smallest swept values above the ones kept
        if len(candidates) >= 3:
            break
        if value >= SMALLEST_LAMBDA and value not in candidates and value > max(candidates, default=0.0):
            candidates.append(value)
    return {"rule": "results/lambda-range/RULE.md, step 1", "caption_loss_at_0": base[0], "bound": limit,
            "within_bound": sorted(within), "knee": lam_k, "candidates": sorted(candidates)}


def _swept_value(value: float, swept: list[float]) -> float:
    """`value` as the swept λ it names (λ_k / 10 is 1e-5, not 1.0000000000000001e-05)."""
    for lam in swept:
        if math.isclose(lam, value, rel_tol=1e-6):
            return lam
    return float(f"{value:.6g}")


def choose_lambda_star(check: dict[str, Any], candidates: list[float], margin: float = QA_MARGIN) -> dict[str, Any]:
    """Step 2 of RULE.md on the λ check's `summary.json`: λ* is the largest candidate whose held-out QA is at
    least plain's minus `margin`, else the smallest candidate. Only QA is read, never a safety result.

    The rule is read from the largest candidate down, so it is decided as soon as the candidates measured
    settle it: a larger candidate that keeps utility makes the smaller ones irrelevant, and the smallest
    candidate is λ* whether or not it keeps utility once every larger one fails. Candidates the decision
    did not need may be left untrained (`needed: false`, no QA); one it needs and lacks is a one-line error."""
    from regap.study.config import arm_name

    arms = (check.get("results") or {}).get("arms") or {}

    def qa_of(arm: str) -> float | None:
        return ((arms.get(arm) or {}).get("qa") or {}).get("mean")

    plain = qa_of("plain")
    if plain is None:
        raise RegapError("the λ check has no held-out QA for plain yet: λ* cannot be chosen")
    ordered = sorted(candidates, reverse=True)
    table: dict[str, dict[str, Any]] = {}
    lam_star: float | None = None
    for lam in ordered:
        arm, qa = arm_name(lam), qa_of(arm_name(lam))
        keeps = None if qa is None else qa >= plain - margin
        needed = lam_star is None and lam != ordered[-1]  # the smallest is λ* whatever its QA
        table[arm] = {"lambda": lam, "qa": qa, "qa_minus_plain": None if qa is None else qa - plain,
                      "keeps_utility": keeps, "needed": needed}
        if lam_star is not None:
            continue
        if not needed or keeps:
            lam_star = lam
        elif qa is None:
            raise RegapError(f"the λ check has no held-out QA for {arm} yet, and the rule needs it (it is read "
                             "from the largest candidate down)")
    star_row = table[arm_name(lam_star)]
    if star_row["keeps_utility"]:
        reason = f"the largest candidate with QA ≥ plain − {margin:g}"
    elif star_row["keeps_utility"] is None:
        reason = (f"every larger candidate has QA < plain − {margin:g}, so the smallest candidate is λ* whether "
                  "or not it keeps utility (not measured)")
    else:
        reason = f"no candidate has QA ≥ plain − {margin:g}: the smallest candidate"
    return {"rule": "results/lambda-range/RULE.md, step 2", "plain_qa": plain, "margin": margin,
            "candidates": {arm_name(lam): table[arm_name(lam)] for lam in sorted(candidates)},
            "lambda_star": lam_star, "arm": arm_name(lam_star), "reason": reason,
            "not_needed": [arm for arm, row in table.items() if not row["needed"] and row["qa"] is None]}


def choose(sweep: Path, check: Path, out: Path | None = None) -> dict[str, Any]:
    """Both steps of RULE.md from the committed files: the sweep's `stage1_sweep.json` (step 1) and the λ
    check's `summary.json` (step 2); written to `OUT/lambda_choice.json` when `out` is given."""
    from regap.files import write_json_atomic

    def load(path: Path, what: str) -> dict[str, Any]:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RegapError(f"{what} not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise RegapError(f"{what} unreadable: {path} ({exc})") from None

    step1 = knee(load(sweep, "stage-1 sweep summary"))
    check_file = check / "summary.json" if check.is_dir() else check
    step2 = choose_lambda_star(load(check_file, "λ check summary"), step1["candidates"])
    result = {"step1": step1, "step2": step2, "lambda_star": step2["lambda_star"], "arm": step2["arm"],
              "inputs": {"sweep": str(sweep), "check": str(check_file)}}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "lambda_choice.json", result)
    return result
