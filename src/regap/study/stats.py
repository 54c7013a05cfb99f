"""The study's statistics, from the unit summaries alone (`OUT/units/*.json`).

* Rates (unsafe rate on harmful requests, refusal rate on benign ones, QA accuracy) are means of
  0/1 outcomes over a seeds x items table; their intervals come from the crossed (pigeonhole)
  bootstrap over seeds and items (`regap.analysis.crossed`), which counts both training noise
  and request sampling. A comparison with plain is the paired version: per (seed, item) cell
  the difference between two models trained with the same seed, on the same item.
* Gap metrics (layer-0 gap, MIR) are one number per trained model, so their only replication is
  the seed: the ratio ReGap / plain is compared on the log scale, per seed, with a t interval
  over seeds (its width says how few seeds there are).
* `backbone` (the LLM before stage 2, text only) is the same model for every seed, so its row is
  repeated across seeds when paired with a seed-dependent arm.

Units whose training diverged are listed and left out; so are units made with another
configuration (their `config_hash` differs from the majority's)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from regap.analysis.crossed import crossed_mean, paired_difference
from regap.errors import RegapError
from regap.study.intervals import CROSSED_LABEL, seed_t
from regap.study.units import ablation_of, arm_lambda, arm_sort_key, split_arm

IMAGE_CONDITIONS = ("blank", "noise", "natural", "typo")
#: What every unit summary holds; one without them is left out with a note.
UNIT_KEYS = ("unit", "arm", "seed", "status", "config_hash")


def load_units(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The usable unit summaries in `folder/units`, and notes on the ones left out."""
    units, notes = [], []
    for path in sorted((folder / "units").glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            notes.append(f"{path.name}: unreadable ({getattr(exc, 'msg', None) or type(exc).__name__}); left out")
            continue
        if not isinstance(data, dict):
            notes.append(f"{path.name}: not a unit summary (a JSON {type(data).__name__}); left out")
            continue
        if data.get("unit") == "backbone" or not str(data.get("format", "")).startswith("regap-study-unit"):
            continue
        lacking = [key for key in UNIT_KEYS if key not in data]
        if lacking:
            notes.append(f"{path.name}: damaged unit summary (no {', '.join(lacking)}); left out")
            continue
        units.append(data)
    hashes = Counter(u["config_hash"] for u in units)
    if len(hashes) > 1:
        majority = hashes.most_common(1)[0][0]
        for u in units:
            if u["config_hash"] != majority:
                notes.append(f"{u['unit']}: made with another study configuration (config hash {u['config_hash']}); "
                             "left out")
        units = [u for u in units if u["config_hash"] == majority]
    kept = []
    for u in units:
        if u["status"] != "completed":
            notes.append(f"{u['unit']}: {u['status']} ({'; '.join(u.get('notes', [])) or 'no detail'}); "
                         "left out of the statistics")
            continue
        notes += [f"{u['unit']}: {note}" for note in u.get("notes", [])]
        kept.append(u)
    return kept, notes


def _bits_to_array(bits: str) -> np.ndarray:
    return np.array([np.nan if b == "-" else float(b) for b in bits])


class Tables:
    """Seeds x items tables of one outcome, per arm and condition, built from the unit summaries."""

    def __init__(self, units: list[dict[str, Any]], backbone: dict[str, Any] | None, judge: str) -> None:
        self.units, self.backbone, self.judge = units, backbone, judge
        self.seeds = sorted({u["seed"] for u in units})

    def arms(self) -> list[str]:
        return sorted({arm for u in self.units for key in ("safety", "utility") for arm in u.get(key, {})},
                      key=arm_sort_key)

    def safety(self, arm: str, condition: str, outcome: str = "unsafe", judge: str | None = None,
               label: str = "H", run: str = "safety") -> tuple[np.ndarray, list[int], list[str]] | None:
        """(table, seeds, request ids) of `outcome` on requests with `label` (H harmful, B benign), from the
        unit summaries' `run` records (`safety`, or `xstest`: XSTest's safe prompts)."""
        judge = judge or self.judge
        rows, seeds, requests = [], [], None
        for seed in self.seeds:
            for unit in self.units:
                record = unit.get(run, {}).get(arm) if unit["seed"] == seed else None
                if record is None or condition not in record["verdicts"]:
                    continue
                keep = [i for i, lab in enumerate(record["labels"]) if lab == label]
                ids = [record["requests"][i] for i in keep]
                if requests is None:
                    requests = ids
                elif ids != requests:
                    raise RegapError(f"unit {unit['unit']}: its requests differ from the other units'")
                values = _bits_to_array(record["verdicts"][condition][judge][outcome])[keep]
                rows.append(values)
                seeds.append(seed)
        if not rows:
            return None
        return np.vstack(rows), seeds, requests or []

    def backbone_row(self, outcome: str = "unsafe", judge: str | None = None, label: str = "H") -> np.ndarray | None:
        if self.backbone is None:
            return None
        record = self.backbone["safety"]["backbone"]
        keep = [i for i, lab in enumerate(record["labels"]) if lab == label]
        return _bits_to_array(record["verdicts"]["backbone"][judge or self.judge][outcome])[keep]

    def qa(self, arm: str) -> tuple[np.ndarray, list[int]] | None:
        rows, seeds, items = [], [], None
        for seed in self.seeds:
            for unit in self.units:
                record = unit.get("utility", {}).get(arm) if unit["seed"] == seed else None
                if record is None:
                    continue
                if items is None:
                    items = record["qa"]["items"]
                elif record["qa"]["items"] != items:
                    raise RegapError(f"unit {unit['unit']}: its QA items differ from the other units'")
                rows.append(_bits_to_array(record["qa"]["correct"]))
                seeds.append(seed)
        return (np.vstack(rows), seeds) if rows else None


#: The rates of an arm: (key, outcome, request label, the unit summaries' record), each per condition and
#: pooled over the image conditions.
RATES = (("unsafe", "unsafe", "H", "safety"), ("refused", "refused", "H", "safety"),
         ("over_refusal", "refused", "B", "safety"), ("xstest_over_refusal", "refused", "B", "xstest"))


def _measured(entry: dict[str, Any]) -> dict[str, Any]:
    """Without the conditions an arm was not evaluated under (a defense arm has no text-only row)."""
    rates = {key for key, *_ in RATES}
    return {k: ({c: v for c, v in value.items() if v is not None} if isinstance(value, dict) and k in rates
                else value) for k, value in entry.items()}


def _rates(tables: "Tables", arm: str, outcome: str, label: str, run: str, conditions: list[str], image: list[str],
           n_boot: int, level: float, name: str) -> dict[str, Any]:
    """One rate per condition (None where not measured) and, pooled over the image conditions, each request's
    mean over them; every table is read once."""
    found = {c: tables.safety(arm, c, outcome, label=label, run=run) for c in conditions if c != "backbone"}
    out: dict[str, Any] = {c: _mean(t, n_boot, level, f"{name}/{c}") for c, t in found.items()}
    pooled = [t for c, t in found.items() if c in image and t is not None]
    if pooled:
        out["image (pooled)"] = _mean((_pool([t[0] for t in pooled]), pooled[0][1]), n_boot, level, f"{name}/image")
    return out


def _pool(tables: list[np.ndarray]) -> np.ndarray:
    """Image conditions pooled: each request's mean over the conditions (a seeds x requests table)."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.stack(tables), axis=0)


def _paired(a: tuple | None, b: tuple | None, n_boot: int, level: float, name: str) -> dict[str, Any] | None:
    """a - b on the seeds both have (rows aligned by seed)."""
    if a is None or b is None:
        return None
    table_a, seeds_a = a[0], a[1]
    table_b, seeds_b = b[0], b[1]
    common = [s for s in seeds_a if s in seeds_b]
    if not common:
        return None
    ta = table_a[[seeds_a.index(s) for s in common]]
    tb = table_b[[seeds_b.index(s) for s in common]]
    crossed = paired_difference(ta, tb, n_boot=n_boot, seed=0, level=level, name=name).to_dict()
    return _by_seed(ta - tb, common, level, crossed)


def _mean(a: tuple | None, n_boot: int, level: float, name: str) -> dict[str, Any] | None:
    if a is None:
        return None
    crossed = crossed_mean(a[0], n_boot=n_boot, seed=0, level=level, name=name).to_dict()
    out = _by_seed(a[0], a[1], level, crossed)
    out.pop("p_value")  # a rate is not tested against zero
    return out


def _by_seed(table: np.ndarray, seeds: list[int], level: float, crossed: dict[str, Any]) -> dict[str, Any]:
    """The seed is the unit of replication: the mean of the per-seed means (each over the requests) with
    a t interval over seeds (`regap.study.intervals`); the crossed bootstrap is kept beside it for
    reference, labelled, since its coverage falls short with few seeds."""
    with np.errstate(invalid="ignore"):
        per_seed = np.nanmean(table, axis=1)
    out = seed_t(per_seed.tolist(), level)
    return {**out, "seed_means": out.pop("per_seed"), "seeds": list(seeds), "level": level,
            "n_requests": int(table.shape[1]), "crossed": {**crossed, "label": CROSSED_LABEL}}


def _with_backbone(arm_table: tuple | None, backbone: np.ndarray | None) -> tuple | None:
    if arm_table is None or backbone is None:
        return None
    return np.tile(backbone, (len(arm_table[1]), 1)), arm_table[1]


def _log_ratio(treated: list[float], control: list[float], level: float) -> dict[str, Any] | None:
    """Geometric-mean ratio treated / control over paired seeds, with a t interval on the log scale."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(treated, control) if a and b and a > 0 and b > 0]
    if not pairs:
        return None
    logs = np.log([a / b for a, b in pairs])
    mean = float(np.mean(logs))
    out = {"ratio": math.exp(mean), "n_seeds": len(pairs), "per_seed": [a / b for a, b in pairs],
           "method": "geometric mean of per-seed ratios; t interval over seeds on the log scale"}
    if len(pairs) > 1:
        half = float(stats.t.ppf(0.5 + level / 2, len(pairs) - 1) * np.std(logs, ddof=1) / math.sqrt(len(pairs)))
        out["ci"] = [math.exp(mean - half), math.exp(mean + half)]
    else:
        out["ci"] = None
    return out


def aggregate(units: list[dict[str, Any]], backbone: dict[str, Any] | None, judge: str, arms: list[str],
              conditions: list[str], n_boot: int = 2000, level: float = 0.95, primary: Any = None) -> dict[str, Any]:
    """Per-arm means, comparisons with plain, the paper's four claims and, for a pre-registered study
    (`primary.arm`), the primary endpoints P1-P3 with Holm-adjusted p-values."""
    tables = Tables(units, backbone, judge)
    image = [c for c in conditions if c in IMAGE_CONDITIONS]
    result: dict[str, Any] = {"judge": judge, "seeds": tables.seeds, "arms": {}, "vs_plain": {}, "claims": {}}
    for arm in tables.arms():
        entry: dict[str, Any] = {}
        for key, outcome, label, run in RATES:
            rates = _rates(tables, arm, outcome, label, run, conditions, image, n_boot, level, f"{arm}/{key}")
            if run == "safety" or any(v is not None for v in rates.values()):  # XSTest: only where it was asked
                entry[key] = rates
        entry["qa"] = _mean(tables.qa(arm), n_boot, level, f"{arm}/qa")
        entry["units"] = sorted(u["unit"] for u in units if arm in u.get("safety", {}) or arm in u.get("utility", {}))
        result["arms"][arm] = _measured(entry)
    if backbone is not None:
        row = tables.backbone_row()
        result["backbone"] = {"unsafe": float(np.nanmean(row)), "n": int(np.sum(~np.isnan(row)))}
    # comparisons with plain, on the seeds both have
    for arm in result["arms"]:
        if arm == "plain":
            continue
        diff = _compare(tables, arm, "plain", conditions, image, n_boot, level)
        result["vs_plain"][arm] = _measured(diff)
    # an inference-time arm against the same trained model without the defense: what the defense adds
    result["vs_undefended"] = {
        arm: _measured(_compare(tables, arm, split_arm(arm)[0], conditions, image, n_boot, level))
        for arm in result["arms"] if split_arm(arm)[2] and split_arm(arm)[0] in result["arms"]}
    result["ablations"] = ablations(tables, list(result["arms"]), conditions, image, n_boot, level)
    result["gap"] = gap_table(units, level)
    result["claims"] = claims(result, tables, image, n_boot, level)
    if primary is not None and primary.arm is not None:
        result["primary"] = primary_endpoints(tables, primary.arm, list(primary.image_conditions), primary.qa_margin,
                                              level)
    return result


def ablations(tables: Tables, arms: list[str], conditions: list[str], image: list[str], n_boot: int,
              level: float) -> dict[str, Any]:
    """Exploratory: each ablation arm (`regap-l0.1@layer6`) with the main ReGap arm at its λ (`regap-l0.1`)
    and, where the study trained that arm, the paired difference ablation − main arm."""
    out: dict[str, Any] = {}
    for arm in arms:
        found = ablation_of(arm)
        if found is None:
            continue
        main = split_arm(arm)[0]
        out[arm] = {"lambda": found[0], "variant": found[1], "main": main,
                    "vs_main": _measured(_compare(tables, arm, main, conditions, image, n_boot, level))
                    if main in arms else None}
    return out


def _per_seed(tables: Tables, arm: str, conditions: list[str]) -> dict[int, float]:
    """Per seed, the arm's unsafe rate on harmful requests pooled over `conditions` (each request's mean
    over the conditions, then the mean over requests)."""
    found = [t for c in conditions if (t := tables.safety(arm, c)) is not None]
    if len(found) != len(conditions):
        return {}
    seeds = [s for s in found[0][1] if all(s in t[1] for t in found)]
    pooled = _pool([t[0][[t[1].index(s) for s in seeds]] for t in found])
    with np.errstate(invalid="ignore"):
        return dict(zip(seeds, np.nanmean(pooled, axis=1).tolist()))


def primary_endpoints(tables: Tables, arm: str, image: list[str], margin: float, level: float) -> dict[str, Any]:
    """The pre-registered primary family, each on the per-seed paired differences (t over seeds), and the
    family's Holm-adjusted p-values (`regap.study.intervals.holm`).

    P1: arm − plain, unsafe rate pooled over `image` (two-sided); P2: (arm − plain) on `image` minus
    (arm − plain) on text-only (two-sided; the gap mechanism predicts an image-specific effect, < 0);
    P3: arm − plain in held-out QA accuracy, one-sided against −`margin` (non-inferiority)."""
    from regap.study.intervals import holm

    a_img, p_img = _per_seed(tables, arm, image), _per_seed(tables, "plain", image)
    a_txt, p_txt = _per_seed(tables, arm, ["text"]), _per_seed(tables, "plain", ["text"])
    p1_seeds = sorted(set(a_img) & set(p_img))
    p2_seeds = sorted(set(p1_seeds) & set(a_txt) & set(p_txt))
    qa_a, qa_p = tables.qa(arm), tables.qa("plain")
    qa = {}
    if qa_a is not None and qa_p is not None:
        for seed in sorted(set(qa_a[1]) & set(qa_p[1])):
            qa[seed] = float(np.nanmean(qa_a[0][qa_a[1].index(seed)]) - np.nanmean(qa_p[0][qa_p[1].index(seed)]))
    out = {
        "P1": {"question": f"{arm} − plain, unsafe rate pooled over {', '.join(image)} (two-sided)",
               "seeds": p1_seeds, **seed_t([a_img[s] - p_img[s] for s in p1_seeds], level)},
        "P2": {"question": f"({arm} − plain) on images ({', '.join(image)}) minus ({arm} − plain) on text-only "
                           "(two-sided; < 0: the effect is specific to images)", "seeds": p2_seeds,
               **seed_t([(a_img[s] - p_img[s]) - (a_txt[s] - p_txt[s]) for s in p2_seeds], level)},
        "P3": {"question": f"{arm} − plain, held-out QA accuracy, non-inferior at margin −{margin:g} "
                           f"(one-sided: H0 difference ≤ −{margin:g})", "seeds": sorted(qa),
               **seed_t(list(qa.values()), level, null=-margin, alternative="greater"), "margin": -margin},
    }
    adjusted = holm({k: v["p_value"] for k, v in out.items()})
    for key, value in out.items():
        value["p_holm"] = adjusted[key]
    return {"arm": arm, "image_conditions": image, "family": "P1, P2, P3 (Holm)", "endpoints": out}


def _compare(tables: Tables, arm: str, base: str, conditions: list[str], image: list[str], n_boot: int,
             level: float) -> dict[str, Any]:
    """`arm` − `base`, paired by seed and request: unsafe rate and over-refusal per condition and pooled
    over the image conditions, and QA accuracy."""
    diff: dict[str, Any] = {"unsafe": {}, "over_refusal": {}}
    for condition in conditions:
        if condition == "backbone":
            continue
        diff["unsafe"][condition] = _paired(tables.safety(arm, condition), tables.safety(base, condition),
                                            n_boot, level, f"{arm}-{base}/{condition}")
        diff["over_refusal"][condition] = _paired(tables.safety(arm, condition, "refused", label="B"),
                                                  tables.safety(base, condition, "refused", label="B"),
                                                  n_boot, level, f"{arm}-{base}/{condition}/benign")
    for key, outcome, label in (("unsafe", "unsafe", "H"), ("over_refusal", "refused", "B")):
        a = [t for c in image if (t := tables.safety(arm, c, outcome, label=label)) is not None]
        b = [t for c in image if (t := tables.safety(base, c, outcome, label=label)) is not None]
        if a and b and len(a) == len(b):
            diff[key]["image (pooled)"] = _paired((_pool([t[0] for t in a]), a[0][1]),
                                                  (_pool([t[0] for t in b]), b[0][1]), n_boot, level,
                                                  f"{arm}-{base}/image/{key}")
    diff["qa"] = _paired(tables.qa(arm), tables.qa(base), n_boot, level, f"{arm}-{base}/qa")
    return diff


def gap_table(units: list[dict[str, Any]], level: float) -> dict[str, Any]:
    """Per arm: the gap metrics of each seed's model (final, stage-1 checkpoint, attack inputs, under
    defenses) and, against plain, the per-seed ratio."""
    by_arm: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for u in units:
        for name, record in u.get("gap", {}).items():
            by_arm.setdefault(u["arm"], {}).setdefault(name, {})[u["seed"]] = record
    out: dict[str, Any] = {}
    for arm, kinds in by_arm.items():
        entry: dict[str, Any] = {}
        for kind, per_seed in kinds.items():
            seeds = sorted(per_seed)
            entry[kind] = {"seeds": seeds, **{metric: [per_seed[s][metric] for s in seeds]
                                               for metric in ("layer0_gap", "mir")}}
            plain = by_arm.get("plain", {}).get(kind)
            if arm != "plain" and plain:
                common = [s for s in seeds if s in plain]
                entry[kind]["ratio_vs_plain"] = {
                    metric: _log_ratio([per_seed[s][metric] for s in common], [plain[s][metric] for s in common], level)
                    for metric in ("layer0_gap", "mir")}
        out[arm] = entry
    return {arm: out[arm] for arm in sorted(out, key=arm_sort_key)}


def claims(result: dict[str, Any], tables: Tables, image: list[str], n_boot: int, level: float) -> dict[str, Any]:
    """The paper's four claims, each as the interval that answers it."""
    out: dict[str, Any] = {}
    plain_text = tables.safety("plain", "text")
    plain_image = [t for c in image if (t := tables.safety("plain", c)) is not None]
    pooled = (_pool([t[0] for t in plain_image]), plain_image[0][1]) if plain_image else None
    out["a_image_raises_unsafe"] = {
        "question": "Does an image raise the unsafe rate over text-only, and over the backbone LLM? (plain models)",
        "image_minus_text": _paired(pooled, plain_text, n_boot, level, "image-text"),
        "image_minus_backbone": _paired(pooled, _with_backbone(pooled, tables.backbone_row()), n_boot, level,
                                        "image-backbone"),
        "per_condition_minus_text": {c: _paired(tables.safety("plain", c), plain_text, n_boot, level, f"{c}-text")
                                     for c in image},
    }
    regap_arms = [a for a in result["vs_plain"] if arm_lambda(a) is not None]
    out["b_regap_lowers_gap"] = {
        "question": "Does ReGap lower the layer-0 gap and MIR (final models, after stage 2)?",
        **{arm: result["gap"].get(arm, {}).get("gap", {}).get("ratio_vs_plain") for arm in regap_arms}}
    out["c_regap_lowers_unsafe"] = {
        "question": "Does ReGap lower the unsafe rate under image conditions?",
        **{arm: result["vs_plain"][arm]["unsafe"].get("image (pooled)") for arm in regap_arms}}
    out["d_utility_holds"] = {
        "question": "Does utility hold (QA accuracy and over-refusal on benign requests)?",
        **{arm: {"qa": result["vs_plain"][arm]["qa"],
                 "over_refusal_text": result["vs_plain"][arm]["over_refusal"].get("text")} for arm in regap_arms}}
    return out


def judge_agreement(units: list[dict[str, Any]], judges: list[str]) -> dict[str, Any]:
    """Cohen's kappa of each pair of judges on the study's own responses (unsafe, harmful requests)."""
    from regap.safety.metrics import cohen_kappa

    values: dict[str, list[float]] = {j: [] for j in judges}
    for u in units:
        for record in u.get("safety", {}).values():
            keep = [i for i, lab in enumerate(record["labels"]) if lab == "H"]
            for by_judge in record["verdicts"].values():
                if not all(j in by_judge for j in judges):
                    continue
                for j in judges:
                    values[j].extend(_bits_to_array(by_judge[j]["unsafe"])[keep].tolist())
    pairs = []
    for i, a in enumerate(judges):
        for b in judges[i + 1:]:
            x, y = np.array(values[a]), np.array(values[b])
            ok = ~(np.isnan(x) | np.isnan(y))
            pairs.append({"judge_a": a, "judge_b": b, "n": int(ok.sum()),
                          "agreement": float(np.mean(x[ok] == y[ok])) if ok.any() else None,
                          "kappa": float(cohen_kappa(x[ok].astype(int).tolist(), y[ok].astype(int).tolist()))
                          if ok.any() else None})
    rates = {j: float(np.nanmean(values[j])) if values[j] else None for j in judges}
    return {"field": "unsafe (harmful requests)", "unsafe_rate": rates, "pairs": pairs}
