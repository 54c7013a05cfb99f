"""`regap study` ablations: the main ReGap arm with one setting changed (a later layer, stage 2, another
distance), named by content (`regap-l0.1@layer6`), trained after every other arm, never taken for the
main ReGap arm or a defended arm, and reported as exploratory. Existing units keep their hash and markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regap.cli import main
from regap.errors import RegapError
from regap.provenance import json_hash
from regap.study.config import ablation_arm, load_study_config, parse_variant_label, variant_label
from regap.study.units import (UnitSpec, ablation_of, arm_lambda, arm_sort_key, gap_closing, is_defended, plan_units,
                               split_arm)

VARIANTS = "ablations.variants=[{layer: 6}, {stage: 2}, {distance: centroid+norm}, {distance: frechet}]"


def _config(*extra: str, name: str = "tiny-study"):
    return load_study_config(name, ["ablations.seeds=[0, 1]", VARIANTS, *extra])


def _runner(config, name: str, work: Path, out: Path | None = None):
    from regap.study.unit import UnitRunner

    spec = next(u for u in plan_units(config) if u.name == name)
    return UnitRunner(config, spec, out or work.parent / "out", work, "float32", log=lambda _: None)


def _work_with_data(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "captions.json").write_text('[{"id": "c"}]')
    (work / "data" / "instructions.json").write_text('[{"id": "i"}]')
    return work


# ---- names ----------------------------------------------------------------------------------------------
def test_ablation_names_round_trip_and_are_never_the_main_or_a_defended_arm():
    config = _config()
    variants = config.ablation_variants()
    assert variants == [(("layer", 6),), (("stage", 2),), (("distance", "centroid+norm"),), (("distance", "frechet"),)]
    arms = [ablation_arm(0.1, v) for v in variants]
    assert arms == ["regap-l0.1@layer6", "regap-l0.1@stage2", "regap-l0.1@centroid+norm", "regap-l0.1@frechet"]
    for variant, arm in zip(variants, arms):
        assert parse_variant_label(variant_label(variant)) == variant
        assert ablation_of(arm) == (0.1, dict(variant))
        assert arm_lambda(arm) is None and not is_defended(arm)  # not the main arm, not a defense
    several = (("layer", 2), ("stage", 2), ("distance", "cosine"))
    assert ablation_arm(1e-4, several) == "regap-l0.0001@layer2,stage2,cosine"
    assert ablation_of("regap-l0.0001@layer2,stage2,cosine") == (1e-4, dict(several))
    assert split_arm("regap-l0.1@centroid+norm") == ("regap-l0.1", "centroid+norm", "")
    assert split_arm("regap-l0.1+cmrm") == ("regap-l0.1", None, "cmrm") and is_defended("regap-l0.1+cmrm")
    assert arm_lambda("regap-l0.1") == 0.1 and ablation_of("regap-l0.1") is None and ablation_of("plain+cmrm") is None
    spec = UnitSpec(arms[1], 1, 0.1, variant=variants[1])
    assert (spec.name, spec.trained_arm, spec.trained_name) == ("regap-l0.1@stage2-s1", arms[1], "regap-l0.1@stage2-s1")
    assert spec.stage1_from == "plain-s1" and UnitSpec(arms[0], 1, 0.1, variant=variants[0]).stage1_from is None


def test_ablations_sort_after_the_trained_arms_and_say_what_they_change():
    arms = ["plain+cmrm", "regap-l0.1@frechet", "moca", "regap-l0.1@centroid+norm", "regap-l1", "plain",
            "regap-l0.1@stage2", "regap-l0.1", "regap-l0.1+cmrm", "regap-l0.1@layer6", "regap-l0.1@layer2"]
    assert sorted(arms, key=arm_sort_key) == [
        "plain", "regap-l0.1", "regap-l1", "moca", "regap-l0.1@layer2", "regap-l0.1@layer6", "regap-l0.1@stage2",
        "regap-l0.1@centroid+norm", "regap-l0.1@frechet", "plain+cmrm", "regap-l0.1+cmrm"]
    assert gap_closing("regap-l0.0001@layer6") == "training: ReGap λ=0.0001 at block 6"
    assert gap_closing("regap-l0.0001@stage2") == "training: ReGap λ=0.0001 in stage 2"
    assert gap_closing("regap-l0.0001@frechet") == "training: ReGap λ=0.0001 with the frechet distance"
    assert gap_closing("regap-l0.0001@centroid+norm") == "training: ReGap λ=0.0001 with the centroid+norm distance"
    from regap.study.frontier import method_and_strength

    assert method_and_strength("regap-l0.1@centroid+norm") == ("regap@centroid+norm", 0.1)  # its own curve
    assert method_and_strength("regap-l0.1") == ("regap", 0.1)


# ---- plan -----------------------------------------------------------------------------------------------
def test_ablation_units_come_last_variant_by_variant_on_their_seeds():
    config = _config("ablations.lam=1e-4")
    names = [u.name for u in plan_units(config)]
    assert names[:len(names) - 8] == [u.name for u in plan_units(load_study_config("tiny-study"))]  # after MoCa
    assert names[-8:] == [f"regap-l0.0001@{v}-s{s}" for v in ("layer6", "stage2", "centroid+norm", "frechet")
                          for s in (0, 1)]
    assert all(u.lam == 1e-4 and u.variant for u in plan_units(config)[-8:])
    assert [u.name for u in plan_units(_config())][-1] == "regap-l0.1@frechet-s1"  # lam null: regap_lambda
    for none in (["ablations.seeds=[]", VARIANTS], ["ablations.seeds=[0]", "ablations.variants=[]"]):
        assert not any("@" in u.name for u in plan_units(load_study_config("tiny-study", none)))


def test_the_plan_shows_ablation_units(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "s"), "--plan", "ablations.seeds=[0]",
                 "ablations.variants=[{layer: 6}, {distance: centroid+norm}]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["regap-l0.1@layer6-s0", "to", "run"] for line in lines)
    assert any(line.split() == ["regap-l0.1@centroid+norm-s0", "to", "run"] for line in lines)
    assert "23 unit(s) to run" in "\n".join(lines)  # 21 + 2


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    (["ablations.seeds=[0]", "ablations.variants=[{layer: 0}]"],
     "ablations.variants[0]: {layer: 0} is the main ReGap arm"),
    (["ablations.seeds=[0]", "ablations.variants=[{stage: 1, distance: centroid}]"], "ablations.variants[0]:"),
    (["ablations.seeds=[0]", "ablations.variants=[{layer: 6}, {stage: 2}, {layer: 6, stage: 1}]"],
     "ablations.variants[2]: {layer: 6, stage: 1} repeats ablations.variants[0] (both are regap-l0.1@layer6)"),
    (["ablations.seeds=[0]", "ablations.variants=[{depth: 6}]"], "ablations.variants[0].depth: not a variant key"),
    (["ablations.seeds=[0]", "ablations.variants=[{layer: -1}]"], "ablations.variants[0].layer: must be an integer >= 0"),
    (["ablations.seeds=[0]", "ablations.variants=[{layer: 1.5}]"], "ablations.variants[0].layer"),
    (["ablations.seeds=[0]", "ablations.variants=[{layer: true}]"], "ablations.variants[0].layer"),
    (["ablations.seeds=[0]", "ablations.variants=[{stage: 3}]"], "ablations.variants[0].stage: must be 1 or 2"),
    (["ablations.seeds=[0]", "ablations.variants=[{distance: l2}]"],
     "ablations.variants[0].distance: 'l2' is not one of centroid, centroid+norm, frechet, cosine"),
    (["ablations.seeds=[]", "ablations.variants=[{stage: 5}]"], "ablations.variants[0].stage"),  # checked anyway
    (["ablations.seeds=[0, 7]", "ablations.variants=[{layer: 6}]"], "ablations.seeds: need distinct seeds among"),
    (["ablations.seeds=[0, 0]", "ablations.variants=[{layer: 6}]"], "ablations.seeds"),
    (["ablations.lam=0", "ablations.variants=[{layer: 6}]"], "ablations.lam: must be > 0"),
    (["ablations.lam=-1"], "ablations.lam: must be > 0"),
    (["ablations.variants=[6]"], "'ablations.variants[0]'"),
    (["ablations.layer=6"], "unknown study config key 'ablations.layer'"),
])
def test_a_bad_ablation_is_one_line_naming_the_key(override, message):
    with pytest.raises(RegapError) as caught:
        load_study_config("tiny-study", override)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ---- training -------------------------------------------------------------------------------------------
def test_layer_and_distance_variants_regularise_stage_1_only(tmp_path):
    from regap.train import load_config

    config = _config()
    work = _work_with_data(tmp_path)
    for name, layer, distance in (("regap-l0.1@layer6-s0", 6, "centroid"), ("regap-l0.1@frechet-s0", 0, "frechet")):
        runner = _runner(config, name, work)
        stage1 = runner._train_overrides(1)
        assert {"regap.lam=0.1", f"regap.layer={layer}", f"regap.distance={distance}"} <= set(stage1)
        assert "regap.lam=0" in runner._train_overrides(2)
        trained = load_config("tiny-stage1", stage1, stage=1)
        assert (trained.regap.lam, trained.regap.layer, trained.regap.distance) == (0.1, layer, distance)
        assert load_config("tiny-stage2", runner._train_overrides(2), stage=2).regap.lam == 0
        assert runner.stage_folder(1) == work / "units" / name / "stage1"


def test_the_stage_2_variant_trains_plain_stage_1_then_regap_in_stage_2(tmp_path):
    from regap.train import load_config

    config = _config()
    work = _work_with_data(tmp_path)
    variant, plain = _runner(config, "regap-l0.1@stage2-s1", work), _runner(config, "plain-s1", work)
    assert variant._train_overrides(1) == plain._train_overrides(1)  # stage 1 is plain's, to the letter
    assert variant.stage_marker_params(1) == plain.stage_marker_params(1)
    assert variant.stage_folder(1) == work / "units" / "plain-s1" / "stage1"
    assert load_config("tiny-stage1", variant._train_overrides(1), stage=1).regap.lam == 0
    stage2 = load_config("tiny-stage2", variant._train_overrides(2), stage=2)
    main_stage1 = load_config("tiny-stage1", _runner(config, "regap-l0.1-s1", work)._train_overrides(1), stage=1)
    assert stage2.regap.lam == 0.1 and (stage2.regap.layer, stage2.regap.distance) == (0, "centroid")
    assert stage2.regap.warmup_steps == main_stage1.regap.warmup_steps  # the main arm's ReGap, one stage later
    assert Path(stage2.projector) == work / "units" / "plain-s1" / "stage1"
    assert "projector=plain-s1/stage1" in variant.stage_marker_params(2)
    assert "projector=stage1" in plain.stage_marker_params(2)


def test_the_stage_2_variant_reuses_plains_stage_1_through_its_marker(tmp_path, monkeypatch):
    from regap.run_lock import exclusive_out
    from regap.study.unit import UnitRunner

    config = _config()
    work = _work_with_data(tmp_path)
    variant = _runner(config, "regap-l0.1@stage2-s0", work)
    trained: list[tuple[str, int]] = []
    monkeypatch.setattr(UnitRunner, "train", lambda self, stage: trained.append((self.spec.name, stage)) if
                        self.stage1_runner is None else UnitRunner._train_plain_stage1(self))
    variant.train(1)  # not done yet: plain's runner trains it
    assert trained == [("plain-s0", 1)]
    with exclusive_out(work / "units" / "plain-s0", flag="unit"):  # plain-s0 running in another process
        with pytest.raises(RegapError, match="in use by another regap run"):
            _runner(config, "regap-l0.1@stage2-s0", work).train(1)
    plain = _runner(config, "plain-s0", work)
    plain.markers.mark("stage1", plain.stage_marker_params(1), 60.0)  # plain's stage 1 finished
    trained.clear()
    with exclusive_out(work / "units" / "plain-s0", flag="unit"):  # read only: plain's lock is not needed
        variant.train(1)
    assert trained == []
    assert variant.training_progress() == "stage 1 done in plain-s0"
    assert _runner(config, "regap-l0.1@layer6-s0", work).training_progress() is None  # trains its own stage 1


# ---- existing studies are untouched -------------------------------------------------------------------
#: `unit_config_hash` of the shipped configs, computed before ablations existed: running studies keep their units.
HASHES = {"tiny-study": "5134a3b912656feb", "tiny-lambda-check": "cd82e09a521d04b3",
          "tiny-study-blind": "b5a14403816bad36"}
#: json_hash of `stage_marker_params(1)`, `(2)` per seed-0 unit, with the data files of `_work_with_data`,
#: computed before ablations existed: the running studies' step markers stay valid.
MARKERS = {
    ("tiny-study", "plain-s0"): ["082e096e4e5dc24d", "32addc496d4a9c48"],
    ("tiny-study", "regap-l0.1-s0"): ["c41e583255518893", "32addc496d4a9c48"],
    ("tiny-study", "plain+cmrm-s0"): ["082e096e4e5dc24d", "32addc496d4a9c48"],
    ("tiny-study", "regap-l0.1+cmrm-s0"): ["c41e583255518893", "32addc496d4a9c48"],
    ("tiny-study", "regap-l1-s0"): ["3a105b2d14fe5c68", "32addc496d4a9c48"],
    ("tiny-study", "moca-s0"): ["346b8060af1cdf80", "60cf506a47dc638f"],
    ("tiny-lambda-check", "plain-s0"): ["082e096e4e5dc24d", "32addc496d4a9c48"],
    ("tiny-lambda-check", "regap-l0.0001-s0"): ["ebef9c8574013cdc", "32addc496d4a9c48"],
    ("tiny-lambda-check", "regap-l1e-06-s0"): ["25d21c5dd976a27b", "32addc496d4a9c48"],
    ("tiny-lambda-check", "regap-l1e-05-s0"): ["0523bf2faa30982d", "32addc496d4a9c48"],
}


def test_existing_configs_keep_their_unit_hash_and_step_markers(tmp_path):
    from regap.study.unit import unit_config_hash

    for name, value in HASHES.items():
        assert unit_config_hash(load_study_config(name)) == value, name
        assert unit_config_hash(load_study_config(name, ["ablations.seeds=[0]", "ablations.lam=1e-3", VARIANTS])) == value
    work = _work_with_data(tmp_path)
    for (name, unit), expected in MARKERS.items():
        for config in (load_study_config(name), load_study_config(name, ["ablations.seeds=[0]", VARIANTS])):
            runner = _runner(config, unit, work)
            assert [json_hash(runner.stage_marker_params(k)) for k in (1, 2)] == expected, (name, unit)


# ---- statistics -----------------------------------------------------------------------------------------
def _unit(arm: str, seed: int, blank: str, qa: str, gap: float) -> dict:
    requests, labels = ["starter-benign/b1", "starter-harmful/h1", "starter-harmful/h2"], "BHH"
    verdicts = {c: {"relevance": {"unsafe": blank if c == "blank" else "000", "refused": "000"}}
                for c in ("text", "blank")}
    return {"format": "regap-study-unit/1", "unit": f"{arm}-s{seed}", "arm": arm, "seed": seed, "status": "completed",
            "config_hash": "h", "timings_seconds": {"x": 60},
            "safety": {arm: {"requests": requests, "labels": labels, "verdicts": verdicts}},
            "utility": {arm: {"qa": {"items": ["q1", "q2"], "correct": qa}}},
            "gap": {"gap": {"layer0_gap": gap, "mir": 1.0}}}


def test_ablation_arms_are_compared_with_plain_and_the_main_arm_but_stay_out_of_the_claims():
    from regap.study.selection import choose_lambda
    from regap.study.stats import aggregate

    units = [_unit(arm, seed, blank, qa, gap) for seed in (0, 1) for arm, blank, qa, gap in (
        ("plain", "011", "10", 100.0), ("regap-l0.1", "001", "11", 1.0), ("regap-l0.1@centroid+norm", "000", "01", 2.0),
        ("regap-l0.1@layer6", "011", "00", 50.0), ("plain+cmrm", "001", "10", 90.0))]
    result = aggregate(units, None, "relevance", ["plain", "regap-l0.1"], ["text", "blank"], n_boot=200)
    assert list(result["arms"]) == ["plain", "regap-l0.1", "regap-l0.1@layer6", "regap-l0.1@centroid+norm",
                                    "plain+cmrm"]
    norm = result["vs_plain"]["regap-l0.1@centroid+norm"]
    assert norm["unsafe"]["blank"]["mean"] == pytest.approx(-1.0) and norm["unsafe"]["blank"]["seeds"] == [0, 1]
    assert set(result["vs_undefended"]) == {"plain+cmrm"}  # the `+` of centroid+norm is not a defense
    assert set(result["ablations"]) == {"regap-l0.1@layer6", "regap-l0.1@centroid+norm"}
    entry = result["ablations"]["regap-l0.1@layer6"]
    assert (entry["main"], entry["variant"], entry["lambda"]) == ("regap-l0.1", {"layer": 6}, 0.1)
    assert entry["vs_main"]["unsafe"]["blank"]["mean"] == pytest.approx(0.5)  # 1.0 vs 0.5 of the harmful cells
    assert result["gap"]["regap-l0.1@layer6"]["gap"]["ratio_vs_plain"]["layer0_gap"]["ratio"] == pytest.approx(0.5)
    for claim in ("b_regap_lowers_gap", "c_regap_lowers_unsafe", "d_utility_holds"):
        assert set(result["claims"][claim]) == {"question", "regap-l0.1"}
    assert set(choose_lambda(result, {"regap-l0.1": [0, 1]}, 0.1)["candidates"]) == {"regap-l0.1"}


def test_an_ablation_cannot_be_the_primary_arm():
    with pytest.raises(RegapError, match="primary.arm: 'regap-l0.1@layer6' is not an arm"):
        _config("primary.arm=regap-l0.1@layer6")


# ---- end to end -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:ReGap at layer 1:UserWarning", "ignore:ReGap is on in stage 2:UserWarning")
def test_a_fast_study_trains_and_reports_its_ablations(tmp_path):
    """One seed of plain, ReGap at λ = 1, and two ablations on the 2-layer random model: ReGap at block 1,
    and ReGap in stage 2 on plain's stage 1."""
    out = tmp_path / "s"
    args = ["study", "--fast", "--out", str(out), "seeds=[0]", "moca=false", "defenses.plain=[]", "defenses.regap=[]",
            "ablations.seeds=[0]", "ablations.variants=[{layer: 1}, {stage: 2}]"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units_planned"] == ["plain-s0", "regap-l1-s0", "regap-l1@layer1-s0", "regap-l1@stage2-s0"]
    assert summary["units"] == sorted(summary["units_planned"])
    work = out / "work" / "units"
    layer1 = json.loads((out / "units" / "regap-l1@layer1-s0.json").read_text())
    stage2 = json.loads((out / "units" / "regap-l1@stage2-s0.json").read_text())
    assert layer1["status"] == stage2["status"] == "completed" and layer1["variant"] == {"layer": 1}
    assert stage2["variant"] == {"stage": 2} and stage2["stage1_from"] == "plain-s0"
    assert "curve" not in layer1 and set(layer1["gap"]) == {"gap", "gap_attack", "gap_stage1"}
    assert not (work / "regap-l1@stage2-s0" / "stage1").exists()  # plain's stage 1, not trained again
    plain = json.loads((out / "units" / "plain-s0.json").read_text())
    assert stage2["training"]["stage1"] == plain["training"]["stage1"] and "stage1" not in stage2["timings_seconds"]
    assert stage2["gap"]["gap_stage1"]["layer0_gap"] == pytest.approx(plain["gap"]["gap_stage1"]["layer0_gap"])

    def regap(unit: str, stage: int) -> dict:
        import yaml

        return yaml.safe_load((work / unit / f"stage{stage}" / "config.yaml").read_text())["regap"]

    assert (regap("regap-l1@layer1-s0", 1)["lam"], regap("regap-l1@layer1-s0", 1)["layer"]) == (1.0, 1)
    assert regap("regap-l1@layer1-s0", 2)["lam"] == 0 and regap("regap-l1@stage2-s0", 2)["lam"] == 1.0
    results = summary["results"]
    assert {"regap-l1@layer1", "regap-l1@stage2"} <= set(results["vs_plain"])
    assert set(results["claims"]["c_regap_lowers_unsafe"]) == {"question", "regap-l1"}
    report = (out / "report.md").read_text()
    section = report.split("## Exploratory: ablations", 1)[1].split("\n## ", 1)[0]
    assert "| regap-l1 | the main ReGap arm" in section
    assert "| regap-l1@layer1 | at block 1 |" in section and "| regap-l1@stage2 | in stage 2 |" in section
    assert "| regap-l1@stage2 | training: ReGap λ=1 in stage 2 |" in report  # the side-by-side table
