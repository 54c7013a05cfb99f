"""The study's statistics against values computed by hand on a tiny fixed table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from regap.study.stats import aggregate, judge_agreement, load_units

REQUESTS = ["starter-benign/b1", "starter-harmful/h1", "starter-harmful/h2", "starter-harmful/h3"]
LABELS = "BHHH"


def _safety(verdicts: dict[str, tuple[str, str]]) -> dict:
    """condition -> (unsafe bits, refused bits) over REQUESTS, the same for both judges but `kw` inverted."""
    out = {}
    for condition, (unsafe, refused) in verdicts.items():
        flipped = "".join({"1": "0", "0": "1"}.get(b, b) for b in unsafe)
        out[condition] = {"relevance": {"unsafe": unsafe, "refused": refused},
                          "kw": {"unsafe": flipped, "refused": refused}}
    return {"requests": REQUESTS, "labels": LABELS, "verdicts": out}


def _unit(arm: str, seed: int, text: str, blank: str, refused_blank: str, qa: str, gap: float, mir: float) -> dict:
    return {"format": "regap-study-unit/1", "unit": f"{arm}-s{seed}", "arm": arm, "seed": seed, "status": "completed",
            "config_hash": "h", "timings_seconds": {"x": 60},
            "safety": {arm: _safety({"text": (text, "0000"), "blank": (blank, refused_blank)})},
            "utility": {arm: {"qa": {"items": ["q1", "q2", "q3", "q4"], "correct": qa}}},
            "gap": {"gap": {"layer0_gap": gap, "mir": mir}}}


UNITS = [
    _unit("plain", 0, "0011", "0111", "1100", "1100", 100.0, 2.0),
    _unit("plain", 1, "0010", "0110", "0000", "1110", 400.0, 3.0),
    _unit("regap-l1", 0, "0011", "0100", "0000", "1000", 10.0, 1.0),
    _unit("regap-l1", 1, "0010", "0010", "1000", "1111", 100.0, 1.5),
]
BACKBONE = {"unit": "backbone", "safety": {"backbone": _safety({"backbone": ("0001", "0000")})}}


@pytest.fixture(scope="module")
def result():
    return aggregate(UNITS, BACKBONE, "relevance", ["plain", "regap-l1"], ["text", "backbone", "blank"], n_boot=4000)


def test_arm_means_are_the_grand_means_of_the_harmful_cells(result):
    plain = result["arms"]["plain"]
    assert plain["unsafe"]["blank"]["mean"] == pytest.approx(5 / 6)  # 111 and 110 on the harmful requests
    assert plain["unsafe"]["text"]["mean"] == pytest.approx(3 / 6)
    assert plain["unsafe"]["blank"]["seed_means"] == pytest.approx([1.0, 2 / 3])
    assert plain["over_refusal"]["blank"]["mean"] == pytest.approx(0.5)  # the one benign request: refused by seed 0
    assert plain["refused"]["blank"]["mean"] == pytest.approx(1 / 6)  # harmful h1, refused by seed 0 only
    assert plain["over_refusal"]["image (pooled)"]["mean"] == pytest.approx(0.5)  # blank is the only image condition
    assert plain["refused"]["image (pooled)"]["mean"] == pytest.approx(1 / 6)
    assert plain["qa"]["mean"] == pytest.approx(5 / 8)
    assert result["backbone"] == {"unsafe": pytest.approx(1 / 3), "n": 3}


def test_paired_difference_is_the_mean_cell_difference(result):
    blank = result["vs_plain"]["regap-l1"]["unsafe"]["blank"]
    # regap - plain per cell: seed 0 (1,0,0)-(1,1,1) and seed 1 (0,1,0)-(1,1,0)
    assert blank["mean"] == pytest.approx(-3 / 6)
    assert blank["seed_means"] == pytest.approx([-2 / 3, -1 / 3])
    # the seed is the unit: a t interval over the two per-seed differences (1 degree of freedom)
    from scipy import stats

    half = stats.t.ppf(0.975, 1) * np.std([-2 / 3, -1 / 3], ddof=1) / math.sqrt(2)
    assert blank["ci"] == pytest.approx([-0.5 - half, -0.5 + half]) and blank["df"] == 1
    assert blank["p_value"] == pytest.approx(stats.ttest_1samp([-2 / 3, -1 / 3], 0).pvalue)
    assert "crossed" in blank["crossed"]["method"] and "reference only" in blank["crossed"]["label"]
    assert result["vs_plain"]["regap-l1"]["unsafe"]["text"]["mean"] == 0.0
    assert result["vs_plain"]["regap-l1"]["qa"]["mean"] == pytest.approx((1 + 4) / 8 - 5 / 8)


def test_gap_ratio_is_a_geometric_mean_with_a_t_interval(result):
    from scipy import stats

    ratio = result["gap"]["regap-l1"]["gap"]["ratio_vs_plain"]["layer0_gap"]
    logs = np.log([10 / 100, 100 / 400])
    half = stats.t.ppf(0.975, 1) * np.std(logs, ddof=1) / math.sqrt(2)
    assert ratio["ratio"] == pytest.approx(math.sqrt(0.1 * 0.25))
    assert ratio["ci"] == pytest.approx([math.exp(logs.mean() - half), math.exp(logs.mean() + half)])
    assert ratio["per_seed"] == pytest.approx([0.1, 0.25])


def test_claims_use_the_pooled_image_conditions_and_the_backbone(result):
    a = result["claims"]["a_image_raises_unsafe"]
    assert a["image_minus_text"]["mean"] == pytest.approx(5 / 6 - 3 / 6)  # blank is the only image condition here
    assert a["image_minus_backbone"]["mean"] == pytest.approx(5 / 6 - 1 / 3)
    assert result["claims"]["c_regap_lowers_unsafe"]["regap-l1"]["mean"] == pytest.approx(-0.5)


def test_judge_agreement_counts_disagreements():
    agreement = judge_agreement(UNITS, ["relevance", "kw"])
    pair = agreement["pairs"][0]
    assert pair["n"] == 4 * 2 * 3 and pair["agreement"] == 0.0
    # relevance says unsafe in 13 of the 24 harmful cells, `kw` in the other 11: observed agreement 0,
    # chance agreement 2 * 13/24 * 11/24, so kappa = -pe / (1 - pe) = -286 / 290
    assert pair["kappa"] == pytest.approx(-286 / 290)


def test_load_units_leaves_out_diverged_and_foreign_units(tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    for u in UNITS[:3]:
        (units / f"{u['unit']}.json").write_text(json.dumps(u))
    (units / "plain-s1.json").write_text(json.dumps({**UNITS[1], "notes": ["stage 2 was trained on other data"]}))
    (units / "regap-l1-s1.json").write_text(json.dumps({**UNITS[3], "status": "diverged", "notes": ["loss nan"]}))
    (units / "plain-s9.json").write_text(json.dumps({**UNITS[0], "unit": "plain-s9", "config_hash": "other"}))
    (units / "broken.json").write_text("{")
    kept, notes = load_units(tmp_path)
    assert sorted(u["unit"] for u in kept) == ["plain-s0", "plain-s1", "regap-l1-s0"]
    assert any("regap-l1-s1: diverged (loss nan)" in n for n in notes)
    assert any("plain-s9: made with another study configuration" in n for n in notes)
    assert any("broken.json: unreadable" in n for n in notes)
    assert "plain-s1: stage 2 was trained on other data" in notes  # a kept unit's notes reach the report


def test_arms_are_reported_trained_first_then_with_defenses():
    from regap.study.units import arm_sort_key, gap_closing

    arms = ["plain+cmrm", "moca", "regap-l1+cmrm", "regap-l1", "plain", "regap-l0.1", "plain+layer0-align"]
    assert sorted(arms, key=arm_sort_key) == ["plain", "regap-l0.1", "regap-l1", "moca", "plain+cmrm",
                                               "plain+layer0-align", "regap-l1+cmrm"]
    assert gap_closing("plain") == "none (plain LLaVA training)"
    assert gap_closing("regap-l0.1+cmrm") == "training: ReGap λ=0.1, inference: cmrm"
    assert gap_closing("moca") == "training: MoCa"


def test_a_defended_arm_is_compared_with_its_own_undefended_model():
    defended = _unit("regap-l1", 0, "0011", "0000", "0000", "0000", 10.0, 1.0)
    defended["arm"] = defended["unit"] = "regap-l1+cmrm"
    defended["safety"] = {"regap-l1+cmrm": defended["safety"].pop("regap-l1")}
    defended["utility"] = {"regap-l1+cmrm": defended["utility"].pop("regap-l1")}
    result = aggregate(UNITS + [defended], BACKBONE, "relevance", ["plain", "regap-l1"], ["text", "blank"], n_boot=500)
    assert list(result["arms"]) == ["plain", "regap-l1", "regap-l1+cmrm"]
    added = result["vs_undefended"]["regap-l1+cmrm"]
    # seed 0 only (the defended arm has no seed 1): harmful blank cells (0,0,0) - (1,0,0); QA 0/4 - 1/4
    assert added["unsafe"]["blank"]["mean"] == pytest.approx(-1 / 3)
    assert added["unsafe"]["image (pooled)"]["mean"] == pytest.approx(-1 / 3)
    assert added["qa"]["mean"] == pytest.approx(-1 / 4)
    assert result["vs_plain"]["regap-l1+cmrm"]["unsafe"]["blank"]["mean"] == pytest.approx(-1.0)  # plain s0: 1,1,1
    assert set(result["vs_undefended"]) == {"regap-l1+cmrm"}  # only defended arms have an undefended twin


def _choice_input(arms: dict[str, tuple[list[int], float, float, float]]) -> dict:
    """arm -> (seeds, unsafe difference vs plain, its upper bound, QA): the parts of an aggregate the rule reads."""
    return {"arms": {arm: {"qa": {"mean": qa}} for arm, (_, _, _, qa) in arms.items()},
            "vs_plain": {arm: {"unsafe": {"image (pooled)": {"mean": d, "ci": [d - 0.05, hi], "seeds": seeds}}}
                         for arm, (seeds, d, hi, _) in arms.items()}}


def test_best_lambda_is_the_one_with_most_qa_among_those_that_lower_unsafe():
    from regap.study.selection import choose_lambda

    choice = choose_lambda(_choice_input({
        "regap-l0.1": ([0, 1, 2], -0.02, 0.03, 0.49),   # does not lower the unsafe rate: out, despite its QA
        "regap-l1": ([0, 1, 2], -0.09, -0.04, 0.47),
        "regap-l10": ([0, 1, 2], -0.20, -0.10, 0.30),
        "regap-l1+cmrm": ([0, 1, 2], -0.30, -0.20, 0.90),  # an inference-time arm is not a λ
        "moca": ([0, 1, 2], -0.09, -0.05, 0.65),
    }), dict.fromkeys(["regap-l0.1", "regap-l1", "regap-l10"], [0, 1, 2]), 0.1)
    assert (choice["arm"], choice["lambda"], choice["decided"]) == ("regap-l1", 1.0, True)
    assert set(choice["candidates"]) == {"regap-l0.1", "regap-l1", "regap-l10"}
    assert not choice["candidates"]["regap-l0.1"]["lowers_unsafe"]


def test_best_lambda_falls_back_to_the_main_arm_and_waits_for_missing_seeds():
    from regap.study.selection import choose_lambda

    choice = choose_lambda(_choice_input({
        "regap-l0.1": ([0, 1, 2], -0.02, 0.03, 0.49),
        "regap-l1": ([0, 1], -0.09, -0.04, 0.47),  # two of three seeds: cannot be chosen yet
    }), dict.fromkeys(["regap-l0.1", "regap-l1"], [0, 1, 2]), 0.1)
    assert (choice["arm"], choice["lambda"]) == ("regap-l0.1", 0.1)
    assert not choice["decided"] and choice["waiting_for"] == ["regap-l1"]
    assert "main arm stays" in choice["reason"]


def test_best_lambda_is_complete_on_the_seeds_planned_for_its_arm():
    """With `exploratory_seeds`, a λ outside the main pair is planned on fewer seeds; it is complete on those."""
    from regap.study.selection import choose_lambda

    choice = choose_lambda(_choice_input({
        "regap-l0.0001": ([0, 1, 2, 3, 4], -0.02, 0.03, 0.60),
        "regap-l1": ([0, 1, 2], -0.09, -0.04, 0.47),
    }), {"regap-l0.0001": [0, 1, 2, 3, 4], "regap-l1": [0, 1, 2]}, 1e-4)
    assert choice["decided"] and choice["arm"] == "regap-l1"


def test_aggregate_feeds_the_rule(result):
    from regap.study.selection import choose_lambda

    choice = choose_lambda(result, {"regap-l1": [0, 1]}, 1.0)
    c = choice["candidates"]["regap-l1"]
    assert c["unsafe_image_vs_plain"]["mean"] == pytest.approx(-0.5) and c["qa"] == pytest.approx(5 / 8)
    assert c["complete"] and choice["arm"] == "regap-l1"


def test_primary_endpoints_are_per_seed_t_tests_with_holm():
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    from regap.study.config import PrimarySpec

    out = aggregate(UNITS, BACKBONE, "relevance", ["plain", "regap-l1"], ["text", "backbone", "blank"], n_boot=200,
                    primary=PrimarySpec(arm="regap-l1", image_conditions=["blank"], qa_margin=0.05))["primary"]
    p1, p2, p3 = (out["endpoints"][k] for k in ("P1", "P2", "P3"))
    assert p1["per_seed"] == pytest.approx([-2 / 3, -1 / 3])
    assert p2["per_seed"] == pytest.approx([-2 / 3 - 0.0, -1 / 3 - 0.0])  # text-only: regap − plain is 0 per seed
    assert p3["per_seed"] == pytest.approx([-1 / 4, 1 / 4]) and p3["margin"] == -0.05
    assert p3["p_value"] == pytest.approx(stats.ttest_1samp([-0.25, 0.25], -0.05, alternative="greater").pvalue)
    raw = [p1["p_value"], p2["p_value"], p3["p_value"]]
    assert [p1["p_holm"], p2["p_holm"], p3["p_holm"]] == pytest.approx(list(multipletests(raw, method="holm")[1]))
