"""`regap study`: config checks, unit planning, and `--fast` end to end (tiny random model):
every unit summarised, the aggregate and report written, reruns resume instead of redoing,
a diverged unit reported and left out of the statistics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from regap.cli import main
from regap.errors import RegapError
from regap.files import file_sha256
from regap.study.config import load_study_config
from regap.study.units import plan_units


def test_shipped_config_loads_and_plans_every_arm():
    config = load_study_config("tiny-study")
    assert len(config.seeds) >= 3 and 0.0 in config.lambdas and len([x for x in config.lambdas if x > 0]) >= 2
    units = plan_units(config)
    names = [u.name for u in units]
    # the plain and main ReGap arms of every seed come first: a partial study is still paired
    main = f"regap-l{config.regap_lambda:g}"
    assert names[:2] == ["plain-s0", f"{main}-s0"]
    defended = ["plain+cmrm", "plain+layer0-align", f"{main}+cmrm"]
    assert len(names) == len(config.seeds) * (len(config.lambdas) + 1 + len(defended))  # + MoCa + defense arms
    cmrm = next(u for u in units if u.name == "plain+cmrm-s1")
    assert cmrm.defense == "cmrm" and cmrm.trained_name == "plain-s1"  # evaluates plain's seed-1 models
    assert names.index("plain+cmrm-s0") > names.index(f"{main}-s{config.seeds[-1]}")
    assert next(u for u in units if u.arm == "moca").moca


def test_exploratory_seeds_narrow_every_arm_but_the_main_pair():
    """A confirmatory pair on five seeds, its exploratory arms (other λ, MoCa, defenses, sweeps) on three."""
    from regap.study.unit import unit_config_hash
    from regap.study.units import planned_seeds

    base = ["seeds=[0,1,2,3,4]", "sweeps={cmrm: {alpha: [0.01, 0.1]}}"]
    config = load_study_config("tiny-study", [*base, "exploratory_seeds=[0,1,2]"])
    seeds = planned_seeds(plan_units(config))
    assert seeds["plain"] == seeds["regap-l0.1"] == [0, 1, 2, 3, 4]
    for arm in ("regap-l1", "moca", "plain+cmrm", "plain+cmrm:alpha=0.01", "plain+layer0-align", "regap-l0.1+cmrm"):
        assert seeds[arm] == [0, 1, 2], arm
    everywhere = planned_seeds(plan_units(load_study_config("tiny-study", base)))
    assert all(s == [0, 1, 2, 3, 4] for s in everywhere.values())
    # an arm list, not a recipe: units already run keep their hash
    assert unit_config_hash(config) == unit_config_hash(load_study_config("tiny-study", base))


@pytest.mark.parametrize("value", ["[]", "[0,0]", "[7]"])
def test_exploratory_seeds_must_be_distinct_seeds_of_the_study(value):
    with pytest.raises(RegapError, match=r"exploratory_seeds: need one or more distinct seeds among the study's seeds \[0, 1, 2\]"):
        load_study_config("tiny-study", [f"exploratory_seeds={value}"])


def test_the_lambda_check_trains_what_the_study_trains_and_measures_no_safety(tmp_path, capsys):
    """results/lambda-range/RULE.md step 2: seed 0 of plain and the candidates, the study's recipe, no safety
    run at all (not even the once-per-study backbone), so the choice of λ never reads a safety result."""
    from regap.study.run import Study

    check, study = load_study_config("tiny-lambda-check"), load_study_config("tiny-study")
    assert check.seeds == [0] and not check.moca and "safety" not in check.evaluations
    assert (check.stage1, check.stage2, check.data) == (study.stage1, study.stage2, study.data)
    assert [u.name for u in plan_units(check)] == ["plain-s0", "regap-l0.0001-s0", "regap-l1e-06-s0", "regap-l1e-05-s0"]
    assert not Study(check, tmp_path / "out", tmp_path / "work").backbone_due()
    assert main(["study", "tiny-lambda-check", "--out", str(tmp_path / "out"), "--plan"]) == 0
    assert "backbone" not in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    (["seedz=[1]"], "unknown study config key 'seedz' in override 'seedz=[1]'; did you mean 'seeds'"),
    (["stage1.stepz=3"], "unknown study config key 'stage1.stepz'"),
    (["lambdas=[0.1,1.0]"], "must contain 0"),
    (["regap_lambda=0.5"], "regap_lambda: 0.5 must be one of"),
    (["stage2.steps=0"], "stage2.steps: must be at least 1"),
    (["safety.primary_judge=llamaguard"], "not one of safety.judges"),
    (["seeds=three"], "'seeds' in override 'seeds=three' must be a list of integers"),
    (["stage1.steps=many"], "'stage1.steps' in override 'stage1.steps=many' must be an integer"),
    (["stage2.projector_lr=fast"], "stage2.projector_lr' in override 'stage2.projector_lr=fast' must be a number"),
    (["stage2.projector_lr=0"], "stage2.projector_lr: must be > 0"),
    (["stage1.scenes=100000"], "stage1.scenes: must be between 1 and data.synth_n"),
    (["data.conversations=every"], "data.conversations: 'every' is not one of sampled, all"),
])
def test_bad_config_is_one_line_naming_the_key(override, message):
    with pytest.raises(RegapError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_study_config("tiny-study", override)


def test_unknown_config_name(tmp_path):
    with pytest.raises(RegapError, match="study config not found"):
        load_study_config(tmp_path / "nope.yaml")


def test_plan_prints_units_and_an_estimate(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "s"), "--plan", "minutes_per_unit=10",
                 "minutes_per_evaluation_unit=2", "budget_minutes=300"]) == 0
    out = capsys.readouterr().out
    # 12 training units (plain, two λ and MoCa on three seeds) and 9 defense-arm units
    assert "plain-s0" in out and "moca-s2" in out and "21 unit(s) to run: about 138 min" in out
    assert "9 evaluation unit(s): 2.0 min each (the config's estimate" in out
    assert "warning" not in out
    assert main(["study", "--out", str(tmp_path / "s"), "--plan", "minutes_per_unit=10", "budget_minutes=60"]) == 0
    assert "warning: that exceeds budget_minutes=60" in capsys.readouterr().out


def _timed_unit(units, name, arm, config_hash, timings, recipe=None, created=""):
    record = {"unit": name, "arm": arm, "status": "completed", "dtype": "float32", "config_hash": config_hash,
              "timings_seconds": timings, "provenance": {"study": recipe or {}, "created_utc": created}}
    (units / f"{name}.json").write_text(json.dumps(record))


def test_estimate_times_training_and_evaluation_units_apart_and_scales_another_recipe(tmp_path):
    from regap.study.run import Study

    config = load_study_config("tiny-study", ["dtype=float32", "stage1.steps=512", "stage1.save_every=64",
                                              "stage2.steps=256", "stage2.save_every=64"])
    out = tmp_path / "s"
    units = out / "units"
    units.mkdir(parents=True)
    study = Study(config, out, progress=False)
    old = {"stage1": {"steps": 256, "global_batch": 8, "save_every": 64},
           "stage2": {"steps": 256, "global_batch": 8, "save_every": 64}}
    # a training unit of an older, shorter recipe: stage 1 doubles (512 vs 256 steps), the curve has
    # 12 checkpoints instead of 8, the evaluations stay as they were
    _timed_unit(units, "plain-s0", "plain", "old", {"stage1": 600, "stage2": 600, "curve": 80, "safety": 600}, old)
    _timed_unit(units, "plain+cmrm-s0", "plain+cmrm", "old", {"gap": 60, "safety": 540})
    _timed_unit(units, "backbone", "backbone", study.config_hash, {"backbone": 6000})  # not a unit's time
    minutes, how = study.minutes_per_unit(training=True)
    assert minutes == pytest.approx((1200 + 600 + 120 + 600) / 60) and "another recipe" in how
    assert study.minutes_per_unit(training=False)[0] == pytest.approx(10.0)
    todo = [u for u in plan_units(config) if u.seed == 0]
    lines = study.estimate(todo)
    n_train = sum(u.defense is None for u in todo)
    n_eval = len(todo) - n_train
    assert lines[0].startswith(f"{len(todo)} unit(s) to run: about {42 * n_train + 10 * n_eval:.0f} min")
    # a unit of this very recipe wins over the rescaled one
    _timed_unit(units, "regap-l0.1-s0", "regap-l0.1", study.config_hash, {"stage1": 1800, "safety": 1200})
    assert study.minutes_per_unit(training=True) == (50.0, "median of the 1 latest training unit(s) run here in float32")
    # a unit whose recipe is not recorded is not guessed at
    (units / "plain-s0.json").unlink()
    (units / "regap-l0.1-s0.json").unlink()
    _timed_unit(units, "moca-s0", "moca", "old", {"stage1": 600})
    assert study.minutes_per_unit(training=True)[1] == "the config's estimate (no unit timed yet)"
    # no evaluation unit timed: a training unit of this recipe lends its evaluation phases, not its training
    (units / "plain+cmrm-s0.json").unlink()
    assert study.minutes_per_unit(training=False)[1] == "the config's estimate (no unit timed yet)"
    _timed_unit(units, "plain-s0", "plain", study.config_hash,
                {"stage1": 6000, "stage2": 6000, "curve": 600, "gap": 120, "safety": 1500, "utility": 300})
    minutes, how = study.minutes_per_unit(training=False)
    assert minutes == pytest.approx(32.0) and how.startswith("the evaluation phases of the 1 latest training unit")


def test_estimate_reads_the_latest_units_so_a_faster_code_version_is_not_outvoted(tmp_path):
    from regap.study.run import RECENT_UNITS, Study

    config = load_study_config("tiny-study", ["dtype=float32"])
    out = tmp_path / "s"
    units = out / "units"
    units.mkdir(parents=True)
    study = Study(config, out, progress=False)
    # four evaluation units timed before a speed-up (30 min each), then three after it (9, 10, 8 min)
    for k, minutes in enumerate([30, 30, 30, 30, 9, 10, 8]):
        _timed_unit(units, f"plain+cmrm-s{k}", "plain+cmrm", study.config_hash, {"safety": minutes * 60},
                    created=f"2026-11-{10 + k:02d}T00:00:00+00:00")
    assert RECENT_UNITS == 3
    minutes, how = study.minutes_per_unit(training=False)
    assert minutes == pytest.approx(9.0)  # the median over all seven would say 30
    assert how == "median of the 3 latest evaluation unit(s) run here in float32"


@pytest.mark.slow
def test_a_unit_held_by_another_process_is_skipped(tmp_path, capsys):
    from regap.run_lock import exclusive_out

    out = tmp_path / "s"
    with exclusive_out(out / "work" / "units" / "plain-s0"):  # as another process running that unit would
        assert main(["study", "--fast", "--out", str(out), "--unit", "plain-s0"]) == 2
    assert "no finished unit" in capsys.readouterr().err
    assert not (out / "units" / "plain-s0.json").exists()


def test_plan_tells_done_running_and_not_asked_for_apart(tmp_path, capsys):
    from regap.run_lock import exclusive_out
    from regap.study.run import Study
    from regap.study.unit import unit_config_hash

    out = tmp_path / "s"
    config = load_study_config("tiny-study", [])
    (out / "units").mkdir(parents=True)
    (out / "units" / "plain-s0.json").write_text(json.dumps({"config_hash": unit_config_hash(config)}))
    with exclusive_out(Study(config, out).work / "units" / "regap-l0.1-s0"):  # another process's unit
        assert main(["study", "--out", str(out), "--plan", "--unit", "plain-s0", "--unit", "regap-l0.1-s0",
                     "--unit", "plain-s1"]) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()
                 if line.split() and line.split()[0] in ("plain-s0", "regap-l0.1-s0", "plain-s1", "plain-s2"))
    assert lines == {"plain-s0": "done", "regap-l0.1-s0": "running (another process holds it)",
                     "plain-s1": "to run", "plain-s2": "not asked for"}


def test_plan_says_how_far_a_started_unit_got(tmp_path, capsys, monkeypatch):
    """A unit run over several sittings: `--plan` shows which stage is done and the checkpoint the next
    sitting resumes from, for the unit and for the defense units that evaluate its models."""
    from regap.files import write_json_atomic
    from regap.run_lock import exclusive_out
    from regap.study.run import Study
    from regap.study.unit import UnitRunner
    from regap.train.checkpoint import FORMAT, checkpoint_name

    out = tmp_path / "s"
    config = load_study_config("tiny-study", [])
    study = Study(config, out)
    spec = next(u for u in plan_units(config) if u.name == "plain-s1")
    runner = study.runner(spec)
    runner.markers.mark("stage1", runner.stage_marker_params(1), 60.0)
    checkpoint = study.work / "units" / "plain-s1" / "stage2" / "checkpoints" / checkpoint_name(256)
    checkpoint.mkdir(parents=True)
    write_json_atomic(checkpoint / "state.json", {"format": FORMAT, "step": 256})
    other_recipe = study.runner(next(u for u in plan_units(config) if u.name == "plain-s2"))
    other_recipe.markers.mark("stage1", ["another recipe's overrides"], 1.0)  # not this recipe's: not done
    reads: list[str] = []  # each unit's checkpoints are read once: for its line and for the estimate
    progress = UnitRunner.training_progress
    monkeypatch.setattr(UnitRunner, "training_progress", lambda self: reads.append(self.spec.name) or progress(self))
    assert main(["study", "--out", str(out), "--plan"]) == 0
    assert sorted(reads) == sorted(set(reads)) and "plain-s1" in reads
    printed = capsys.readouterr().out.splitlines()
    lines = dict(line.split(maxsplit=1) for line in printed
                 if line.split() and line.split()[0] in ("plain-s1", "plain+cmrm-s1", "plain-s2", "regap-l0.1-s1"))
    assert "1 training unit(s) already started: counted whole, so the estimate is high" in "\n".join(printed)
    assert lines == {"plain-s1": "to run (stage 1 done; stage 2 checkpoint at step 256/768)",
                     "plain+cmrm-s1": "to run (stage 1 done; stage 2 checkpoint at step 256/768)",
                     "plain-s2": "to run", "regap-l0.1-s1": "to run"}
    unreadable = study.work / "units" / "regap-l0.1-s1" / "stage1" / "checkpoints" / checkpoint_name(8)
    unreadable.mkdir(parents=True)
    (unreadable / "state.json").write_text('{"format": "something else"}')
    spec = next(u for u in plan_units(config) if u.name == "regap-l0.1-s1")
    assert study.runner(spec).training_progress() == "stage 1 checkpoint at step ?/1024"  # shown, not fatal

    with exclusive_out(study.work / "units" / "plain-s1"):  # the next sitting, in another process
        assert main(["study", "--out", str(out), "--plan", "--unit", "plain-s1"]) == 0
    assert ("plain-s1                 running (another process holds it; stage 1 done; stage 2 checkpoint at "
            "step 256/768)") in capsys.readouterr().out.splitlines()


def test_bad_unit_name_fails_before_any_work(tmp_path, capsys):
    assert main(["study", "--fast", "--out", str(tmp_path / "s"), "--unit", "plain-s9"]) == 2
    assert "unknown unit(s) plain-s9" in capsys.readouterr().err
    assert not (tmp_path / "s" / "work").exists()


@pytest.fixture(scope="module")
def fast_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "fast"
    assert main(["study", "--fast", "--out", str(out), "--max-units", "2"]) == 0  # a first sitting: two units
    assert sorted(p.name for p in (out / "units").glob("*.json")) == ["backbone.json", "plain-s0.json",
                                                                      "regap-l1-s0.json"]
    first = json.loads((out / "summary.json").read_text())
    assert any("not run yet" in note for note in first["notes"])
    assert main(["study", "--fast", "--out", str(out)]) == 0  # the second sitting runs the rest
    return out


@pytest.mark.slow
def test_fast_study_summarises_every_unit(fast_study):
    summary = json.loads((fast_study / "summary.json").read_text())
    assert summary["units"] == sorted(summary["units_planned"])
    results = summary["results"]
    assert set(results["arms"]) == {"plain", "regap-l1", "moca", "plain+cmrm", "plain+layer0-align", "regap-l1+cmrm"}
    for condition in ("text", "blank", "noise", "natural", "typo", "image (pooled)"):
        entry = results["arms"]["plain"]["unsafe"][condition]
        assert entry["n_seeds"] == 2 and entry["n_requests"] == 3 and "t interval over the per-seed" in entry["method"]
        assert "crossed" in entry["crossed"]["method"]
    assert "text" not in results["arms"]["plain+cmrm"]["unsafe"]  # defenses: image conditions only
    assert results["vs_plain"]["regap-l1"]["unsafe"]["blank"]["p_value"] is not None
    for claim in ("a_image_raises_unsafe", "b_regap_lowers_gap", "c_regap_lowers_unsafe", "d_utility_holds"):
        assert claim in results["claims"]
    assert results["gap"]["regap-l1"]["gap"]["ratio_vs_plain"]["layer0_gap"]["n_seeds"] == 2
    assert {p["judge_a"] for p in summary["judge_agreement"]["pairs"]} == {"relevance", "refusal-lexicon"}
    unit = json.loads((fast_study / "units" / "plain-s0.json").read_text())
    assert unit["status"] == "completed" and set(unit["gap"]) == {"gap", "gap_attack", "gap_stage1"}
    defended = json.loads((fast_study / "units" / "plain+cmrm-s0.json").read_text())
    assert defended["evaluates"] == "plain-s0" and defended["gap"]["gap"]["defenses"][0]["name"] == "cmrm"
    assert set(defended["safety"]["plain+cmrm"]["verdicts"]) == {"blank", "noise", "natural", "typo"}
    assert len(unit["safety"]["plain"]["labels"]) == 5 and "curve" in unit  # seed 0 has the learning curve
    assert [p["step"] for p in unit["curve"]["stage2"]["qa"]] == [1, 2]
    assert unit["provenance"]["versions"]["torch"]
    study_data = fast_study / "work" / "data" / "instructions.json"
    assert unit["training"]["stage2"]["data"]["sha256"] == file_sha256(study_data) and unit["notes"] == []
    markdown = (fast_study / "report.md").read_text()
    assert "The paper's four claims" in markdown and "figures/unsafe_by_arm.png" in markdown
    assert "Refusal rate on harmful requests" in markdown and "Under `refusal-lexicon`: (a) image" in markdown
    side = markdown.split("side by side", 1)[1].split("## The paper's four claims", 1)[0]
    assert "| regap-l1+cmrm | training: ReGap λ=1, inference: cmrm |" in side and "| moca | training: MoCa |" in side
    assert set(results["vs_undefended"]) == {"plain+cmrm", "plain+layer0-align", "regap-l1+cmrm"}
    assert set(results["arms"]["plain"]["refused"]) == {"text", "blank", "noise", "natural", "typo", "image (pooled)"}
    figures = sorted(p.name for p in (fast_study / "figures").glob("*.png"))
    assert {"unsafe_by_arm.png", "frontier.png"} <= set(figures)
    assert (fast_study / "report.html").read_text().count("data:image/png;base64,") == len(figures)  # each inlined
    choice = summary["best_lambda"]
    assert set(choice["candidates"]) == {"regap-l1"} and choice["decided"] and choice["lambda"] == 1.0
    assert f"Choice: **{choice['arm']}**" in markdown and "| regap-l1 | 0, 1 |" in markdown


@pytest.mark.slow
def test_rerun_skips_summarised_units(fast_study):
    before = {p.name: p.stat().st_mtime for p in (fast_study / "units").glob("*.json")}
    assert main(["study", "--fast", "--out", str(fast_study)]) == 0
    assert {p.name: p.stat().st_mtime for p in (fast_study / "units").glob("*.json")} == before


@pytest.mark.slow
def test_an_interrupted_unit_resumes_from_its_last_step(fast_study):
    (fast_study / "units" / "moca-s1.json").unlink()
    steps = fast_study / "work" / "units" / "moca-s1" / ".steps"
    (steps / "safety.json").unlink()  # as if stopped during the safety step
    trained = (fast_study / "work" / "units" / "moca-s1" / "stage2" / "projector.safetensors").stat().st_mtime
    assert main(["study", "--fast", "--out", str(fast_study), "--unit", "moca-s1"]) == 0
    assert (fast_study / "work" / "units" / "moca-s1" / "stage2" / "projector.safetensors").stat().st_mtime == trained
    assert (steps / "safety.json").exists() and (fast_study / "units" / "moca-s1.json").exists()


@pytest.mark.slow
def test_a_diverged_unit_is_reported_and_left_out(fast_study, monkeypatch, tmp_path):
    import shutil

    from regap.study import unit as unit_module
    from regap.train.step import NonFiniteLossError

    out = tmp_path / "copy"
    shutil.copytree(fast_study, out, ignore=shutil.ignore_patterns("work"))
    (out / "units" / "regap-l1-s1.json").unlink()

    def diverge(self, stage):
        raise NonFiniteLossError("loss is nan at step 2")

    monkeypatch.setattr(unit_module.UnitRunner, "train", diverge)
    assert main(["study", "--fast", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    unit = json.loads((out / "units" / "regap-l1-s1.json").read_text())
    assert unit["status"] == "diverged" and "nan" in unit["notes"][0]
    summary = json.loads((out / "summary.json").read_text())
    assert any(n.startswith("regap-l1-s1: diverged") for n in summary["notes"])
    assert summary["results"]["arms"]["regap-l1"]["unsafe"]["text"]["seeds"] == [0]
    assert "regap-l1-s1: diverged" in (out / "report.md").read_text()


@pytest.mark.slow
def test_no_run_rebuilds_the_report_from_unit_summaries(fast_study, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(fast_study, out, ignore=shutil.ignore_patterns("work", "report.*", "summary.json", "figures"))
    assert main(["study", "--fast", "--out", str(out), "--no-run"]) == 0
    assert json.loads((out / "summary.json").read_text())["results"] == \
        json.loads((fast_study / "summary.json").read_text())["results"]
    assert not (out / "work").exists()


def test_stage_learning_rates_and_scene_counts_reach_the_training_configs(tmp_path):
    """`stageN.projector_lr` and `stageN.scenes` become the stage's `projector_lr` and `data.max_items`
    (the first N scenes); unset, the shipped stage configs' values stay."""
    from regap.study.unit import UnitRunner
    from regap.train import load_config

    def stage_configs(overrides):
        config = load_study_config("tiny-study-blind", overrides)  # the recipe with both keys at their defaults
        spec = next(u for u in plan_units(config) if u.name == "plain-s0")
        runner = UnitRunner(config, spec, tmp_path / "out", tmp_path / "work", "float32", log=lambda _: None)
        return [load_config(f"tiny-stage{k}", runner._train_overrides(k), stage=k) for k in (1, 2)]

    default1, default2 = stage_configs([])
    assert default1.data.max_items is None and default2.data.max_items is None
    stage1, stage2 = stage_configs(["stage1.scenes=128", "stage2.projector_lr=2e-4"])
    assert stage1.data.max_items == 128 and stage2.data.max_items is None
    assert stage2.projector_lr == pytest.approx(2e-4) and stage2.projector_lr != default2.projector_lr
    assert stage1.projector_lr == default1.projector_lr
    assert default1.attn_implementation is None and default2.attn_implementation is None
    assert [c.attn_implementation for c in stage_configs(["attn_implementation=eager"])] == ["eager", "eager"]
    with pytest.raises(RegapError, match="'attn_implementation' is 'flash'"):
        stage_configs(["attn_implementation=flash"])


def test_all_conversations_reach_the_study_data_and_regenerate_it(tmp_path):
    """`data.conversations=all` writes every question of a scene into stage 2's instructions; switching
    back regenerates the default data (the step marker holds the setting)."""
    from regap.study.run import Study

    def study_data(value):
        config = load_study_config("tiny-study", ["data.synth_n=3", f"data.conversations={value}"])
        Study(config, tmp_path / "out", tmp_path / "work", progress=False).data()
        folder = tmp_path / "work" / "data"
        turns = sum(len(r["conversations"]) // 2 for r in json.loads((folder / "instructions.json").read_text()))
        return json.loads((folder / "manifest.json").read_text())["conversations"], turns

    manifest_all, turns_all = study_data("all")
    manifest_sampled, turns_sampled = study_data("sampled")
    assert (manifest_all, manifest_sampled) == ("all", "sampled") and turns_all > turns_sampled


def test_a_new_arm_keeps_the_units_comparable_but_a_changed_recipe_does_not():
    from regap.study.unit import unit_config_hash

    base = unit_config_hash(load_study_config("tiny-study-blind"))  # the recipe the first units ran
    for more_arms in (["defenses.plain=[cmrm, layer0-align, cmrm:alpha=0.5]"], ["moca=false"], ["seeds=[0,1,2,3]"],
                      ["lambdas=[0,0.1,1,10]"], ["regap_lambda=1"]):
        assert unit_config_hash(load_study_config("tiny-study-blind", more_arms)) == base, more_arms
    for recipe in (["stage1.steps=128"], ["defenses.conditions=[blank]"], ["safety.max_new_tokens=32"],
                   ["stage2.projector_lr=2e-4"], ["stage1.scenes=256"], ["data.conversations=all"],
                   ["attn_implementation=eager"]):
        assert unit_config_hash(load_study_config("tiny-study-blind", recipe)) != base, recipe
    # stage keys added after units were run count only when set: the finished units keep their hash
    unset = ["stage1.projector_lr=null", "stage2.scenes=null", "data.conversations=sampled", "attn_implementation=null"]
    assert unit_config_hash(load_study_config("tiny-study-blind", unset)) == base
    # ... and the committed units of that recipe are still its units (their report rebuilds with --no-run)
    committed = Path(__file__).parents[1] / "results" / "tiny-study-blind" / "units" / "plain-s0.json"
    if committed.is_file():
        assert json.loads(committed.read_text())["config_hash"] == base
    assert unit_config_hash(load_study_config("tiny-study")) != base  # the shipped recipe is another one


def test_a_stage_trained_on_other_data_is_noted(tmp_path):
    """An adopted run (or study data regenerated after a stage ran) must not pass as the study's."""
    from regap.study.records import training_data_note

    data = tmp_path / "instructions.json"
    data.write_text("[]")
    stage = tmp_path / "stage2"
    stage.mkdir()
    assert training_data_note(2, stage, data) is None  # no provenance yet: nothing to compare
    (stage / "provenance.json").write_text(json.dumps({"data": {"json": str(data), "sha256": file_sha256(data)}}))
    assert training_data_note(2, stage, data) is None
    (stage / "provenance.json").write_text(json.dumps({"data": {"json": "/elsewhere/dense.json", "sha256": "ab" * 32}}))
    note = training_data_note(2, stage, data)
    assert note is not None and "/elsewhere/dense.json" in note and "abababababab" in note
    assert file_sha256(data)[:12] in note


def test_a_stage_marker_ignores_the_progress_display(tmp_path):
    """Running a unit with or without progress bars must not redo (or refuse to resume) its training."""
    from regap.study.unit import UnitRunner

    config = load_study_config("tiny-study")
    spec = next(u for u in plan_units(config) if u.name == "plain-s0")

    def runner(progress: bool) -> UnitRunner:
        return UnitRunner(config, spec, tmp_path / "out", tmp_path / "work", "float32", log=lambda _: None,
                          progress=progress)

    shown, hidden = runner(True), runner(False)
    assert shown._train_overrides(1) != hidden._train_overrides(1)  # the display does reach training
    for stage in (1, 2):
        assert shown.stage_marker_params(stage) == hidden.stage_marker_params(stage)
    assert shown.stage_marker_params(1) != shown.stage_marker_params(2)


def test_a_step_that_knows_its_own_time_records_it(tmp_path):
    """A stage resumed over sittings reports its training time over all of them, not the wall time of
    the sitting that finished it; a step without that knowledge keeps its wall time."""
    from regap.study.steps import StepMarkers

    markers = StepMarkers(tmp_path)
    assert markers.run("stage1", ["a"], lambda: None, seconds=lambda: 4321.0)
    assert markers.run("gap", ["b"], lambda: None)
    assert markers.timings == {"stage1": 4321.0, "gap": pytest.approx(0.0, abs=0.5)}
    again = StepMarkers(tmp_path)
    assert not again.run("stage1", ["a"], lambda: pytest.fail("a marked step must not rerun"))
    assert again.timings["stage1"] == 4321.0


def test_a_step_finished_in_a_later_sitting_counts_the_earlier_ones(tmp_path):
    """A killed sitting leaves its time in the partial record (the heartbeat writes it while the step
    runs); the sitting that finishes the step adds it, and a partial record of other params is not counted."""
    import json
    import time as _time

    from regap.study.steps import StepMarkers

    markers = StepMarkers(tmp_path, heartbeat_s=0.01)

    def until_the_heartbeat_wrote() -> None:
        deadline = _time.time() + 10
        while not markers.partial_path("safety").exists():
            assert _time.time() < deadline, "no partial record while the step ran"
            _time.sleep(0.01)

    assert markers.run("safety", ["p"], until_the_heartbeat_wrote)
    assert not markers.partial_path("safety").exists(), "a finished step keeps no partial record"

    # a sitting killed after 600 s of this step (what its heartbeat left), then a sitting that finishes it
    killed = StepMarkers(tmp_path)
    killed._record_partial("gap", ["q"], 600.0)
    assert killed.run("gap", ["q"], lambda: None)
    assert killed.timings["gap"] == pytest.approx(600.0, abs=0.5)
    assert json.loads(killed.path("gap").read_text())["seconds"] == pytest.approx(600.0, abs=0.5)

    # the record of a step with other params belongs to another run of it
    other = StepMarkers(tmp_path)
    other._record_partial("utility", ["old"], 900.0)
    assert other.run("utility", ["new"], lambda: None)
    assert other.timings["utility"] == pytest.approx(0.0, abs=0.5)


def test_an_interrupted_step_keeps_its_time_for_the_rerun(tmp_path):
    from regap.study.steps import StepMarkers

    markers = StepMarkers(tmp_path)
    markers._record_partial("curve", ["c"], 100.0)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        markers.run("curve", ["c"], interrupted)
    assert not markers.done("curve", ["c"])
    assert markers.earlier_seconds("curve", ["c"]) == pytest.approx(100.0, abs=0.5)
    assert markers.run("curve", ["c"], lambda: None)
    assert markers.timings["curve"] == pytest.approx(100.0, abs=0.5)


def test_training_seconds_sums_each_sitting_once():
    from regap.train import training_seconds

    old_file = [{"step": 1, "elapsed_s": 5.0}, {"step": 2, "elapsed_s": 10.0}, {"step": 3, "elapsed_s": 4.0},
                {"step": 4, "elapsed_s": 8.5}]  # resumed after step 2, before the flag existed
    assert training_seconds(old_file) == 18.5
    flagged = [{"step": 1, "elapsed_s": 2.0, "sitting_start": True}, {"step": 2, "elapsed_s": 3.0},
               {"step": 3, "elapsed_s": 7.0, "sitting_start": True}]  # a slow first step after the resume
    assert training_seconds(flagged) == 10.0
    assert training_seconds([{"step": 1}, {"step": 2, "elapsed_s": 1.5}]) == 1.5


def test_report_shows_each_seeds_difference_from_plain():
    """With two or three seeds the pooled interval hides whether the seeds agree; the table shows it."""
    from regap.study.study_report import _seeds, per_seed_table

    def entry(means, seeds):
        return {"mean": sum(means) / len(means), "ci": [-1, 1], "seed_means": means, "seeds": seeds}

    vs_plain = {
        "regap": {"unsafe": {"blank": entry([-0.25, 0.05], [0, 2]), "image (pooled)": entry([-0.1, 0.0], [0, 2])},
                  "qa": entry([-0.2, -0.1], [0, 2])},
        "plain+cmrm": {"unsafe": {"blank": entry([-0.6], [1]), "image (pooled)": None}, "qa": None},
    }
    lines = per_seed_table(vs_plain, ["text", "blank", "image (pooled)"])
    rows = [line for line in lines if line.startswith("| regap") or line.startswith("| plain")]
    assert rows == ["| regap | 0 | – | -0.250 | -0.100 | -0.200 |",
                    "| regap | 2 | – | +0.050 | +0.000 | -0.100 |",
                    "| plain+cmrm | 1 | – | -0.600 | – | – |"]
    assert _seeds(entry([-0.0875, -0.0083], [0, 1])) == " (per seed -0.087, -0.008)"
    assert _seeds(entry([0.3], [0])) == "" and _seeds(None) == ""


def test_a_stopped_training_step_tells_to_rerun_the_study_not_to_resume_the_stage(tmp_path, monkeypatch, capsys):
    """The trainer's own advice (`--resume --out WORK/units/U/stage1`) is wrong inside a study: the
    study's step markers resume the stage when the same study command runs again."""
    from regap.errors import RunInterrupted
    from regap.study.run import Study

    def stopped_in_training(self, units, max_units):
        raise RunInterrupted("training stopped at step 67/1024; last checkpoint W/step-0000067",
                             "continue with --resume --out W")

    monkeypatch.setattr(Study, "run", stopped_in_training)
    assert main(["study", "--fast", "--out", str(tmp_path / "s"), "--unit", "plain-s0"]) == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == ("interrupted: study stopped: training stopped at step 67/1024; last checkpoint "
                       "W/step-0000067; rerun the same command to continue (finished steps are reused)")


def test_stage_markers_key_on_content_not_on_the_folder(tmp_path):
    """Two copies of a study in different folders, with the same data, share their stage-marker keys
    (a moved or copied study continues); other data give another key."""
    from regap.study.unit import UnitRunner

    config = load_study_config("tiny-study")
    spec = next(u for u in plan_units(config) if u.name == "regap-l1-s0")
    runners = []
    for where in ("a", "b"):
        work = tmp_path / where / "work"
        (work / "data").mkdir(parents=True)
        (work / "data" / "captions.json").write_text('[{"id": "x"}]')
        (work / "data" / "instructions.json").write_text('[{"id": "y"}]')
        runners.append(UnitRunner(config, spec, tmp_path / where, work, "float32", log=lambda _: None))
    for stage in (1, 2):
        params = runners[0].stage_marker_params(stage)
        assert params == runners[1].stage_marker_params(stage)
        assert not any(str(tmp_path) in p for p in params)
        assert runners[0].legacy_stage_marker_params(stage) != runners[1].legacy_stage_marker_params(stage)
    (tmp_path / "b" / "work" / "data" / "captions.json").write_text('[{"id": "z"}]')
    changed = UnitRunner(config, spec, tmp_path / "b", tmp_path / "b" / "work", "float32", log=lambda _: None)
    assert changed.stage_marker_params(1) != runners[0].stage_marker_params(1)


def test_a_marker_under_the_older_key_counts_and_is_rekeyed(tmp_path):
    from regap.study.steps import StepMarkers

    markers = StepMarkers(tmp_path)
    markers.mark("stage1", ["data.json=/old/place/captions.json"], 12.0)
    ran = []
    assert not markers.run("stage1", ["data.sha256=abc"], lambda: ran.append(1),
                           legacy=["data.json=/old/place/captions.json"])
    assert not ran and markers.done("stage1", ["data.sha256=abc"]) and markers.timings["stage1"] == 12.0
    assert markers.run("stage1", ["data.sha256=other"], lambda: ran.append(1))  # other content: runs
    assert ran == [1]


@pytest.mark.slow
def test_a_moved_study_folder_continues_without_training_again(fast_study, tmp_path):
    """`mv OUT OUT2` (work folder inside): an unfinished unit resumes its evaluations in the new place;
    its training (hours on a CPU) is kept."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(fast_study, moved)
    (moved / "units" / "moca-s1.json").unlink()
    steps = moved / "work" / "units" / "moca-s1" / ".steps"
    (steps / "safety.json").unlink()
    weights = moved / "work" / "units" / "moca-s1" / "stage2" / "projector.safetensors"
    trained = weights.stat().st_mtime
    assert main(["study", "--fast", "--out", str(moved), "--unit", "moca-s1"]) == 0
    assert weights.stat().st_mtime == trained and (moved / "units" / "moca-s1.json").exists()


@pytest.mark.slow
def test_every_unit_keeps_its_answers_and_rejudging_them_reproduces_its_verdicts(fast_study, tmp_path):
    """The answers beside each summary are what the judges saw: re-judging them with no model gives
    the very verdict strings the unit stored."""
    import shutil

    from regap.study.answers import read_answers

    out = tmp_path / "copy"
    shutil.copytree(fast_study, out, ignore=shutil.ignore_patterns("work"))
    names = [p.stem for p in (out / "units").glob("*.json")]
    assert "backbone" in names
    for name in names:
        rows = read_answers(out / "units" / f"{name}.answers.jsonl.gz")
        safety = [r for r in rows if r["kind"] == "safety"]
        assert safety and all(r["answer"] is not None and r["decoding"]["max_new_tokens"] > 0 for r in safety)
        assert json.loads((out / "units" / f"{name}.json").read_text())["answers"] == f"{name}.answers.jsonl.gz"
        if name != "backbone":
            assert any(r["kind"] == "qa" for r in rows)
    before = {n: json.loads((out / "units" / f"{n}.json").read_text())["safety"] for n in names}
    judges = json.loads((out / "summary.json").read_text())["config"]["safety"]["judges"]
    for unit in names:  # scramble one judge's stored verdicts: the rejudge must restore them from the answers
        data = json.loads((out / "units" / f"{unit}.json").read_text())
        for record in data["safety"].values():
            for by_judge in record["verdicts"].values():
                by_judge[judges[0]] = {k: "-" * len(v) for k, v in by_judge[judges[0]].items()}
        (out / "units" / f"{unit}.json").write_text(json.dumps(data))
    assert main(["study", "--fast", "--out", str(out), "--rejudge", ",".join(judges)]) == 0
    after = {n: json.loads((out / "units" / f"{n}.json").read_text())["safety"] for n in names}
    for name in names:
        for arm, record in before[name].items():
            assert after[name][arm]["verdicts"] == record["verdicts"], name


@pytest.mark.slow
def test_rejudge_names_units_without_answers(fast_study, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(fast_study, out, ignore=shutil.ignore_patterns("work"))
    (out / "units" / "plain-s0.answers.jsonl.gz").unlink()
    assert main(["study", "--fast", "--out", str(out), "--rejudge", "keyword"]) == 0
    assert "no answers kept for plain-s0" in capsys.readouterr().out
    assert main(["study", "--fast", "--out", str(out), "--rejudge", "nosuchjudge"]) == 2


@pytest.mark.slow
def test_damaged_unit_summaries_are_left_out_with_a_note(fast_study, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(fast_study, out, ignore=shutil.ignore_patterns("work"))
    units = out / "units"
    (units / "moca-s0.json").write_text("[]")
    (units / "moca-s1.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    data = json.loads((units / "regap-l1-s1.json").read_text())
    del data["config_hash"]
    (units / "regap-l1-s1.json").write_text(json.dumps(data))
    text = (units / "backbone.json").read_text()
    (units / "backbone.json").write_text(text[: len(text) // 2])
    for extra in ([], ["--plan"]):
        assert main(["study", "--fast", "--out", str(out), "--no-run", *extra]) == 0
    notes = " ".join(json.loads((out / "summary.json").read_text())["notes"])
    assert "moca-s0.json: not a unit summary" in notes and "moca-s1.json: unreadable" in notes
    assert "regap-l1-s1.json: damaged unit summary (no config_hash)" in notes
    assert "backbone (the LLM before stage 2, text only) not run yet" in notes


@pytest.mark.slow
def test_a_lost_backbone_summary_is_planned_and_run_again(fast_study, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(fast_study, out)
    (out / "units" / "backbone.json").unlink()
    assert main(["study", "--fast", "--out", str(out), "--plan"]) == 0
    assert re.search(r"^backbone\s+to run$", capsys.readouterr().out, re.M)
    assert main(["study", "--fast", "--out", str(out)]) == 0
    assert json.loads((out / "units" / "backbone.json").read_text())["status"] == "completed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["claims"]["a_image_raises_unsafe"]["image_minus_backbone"] is not None


def test_a_study_naming_a_missing_preregistration_runs_nothing(tmp_path, capsys):
    assert main(["study", "--fast", "--out", str(tmp_path / "s"), "preregistration=PREREGISTRATION.md"]) == 2
    assert "pre-registration" in capsys.readouterr().err and not (tmp_path / "s" / "work").exists()


@pytest.mark.parametrize("override, message", [
    (["primary.arm=regap-l7"], "primary.arm: 'regap-l7' is not an arm"),
    (["primary.arm=regap-l0.1", "primary.image_conditions=[text]"], "primary.image_conditions"),
    (["preregistration=../elsewhere.md"], "must be a path inside the results folder"),
    (["evaluations=[safety,vibes]"], "evaluations: vibes not one of"),
])
def test_bad_confirmatory_settings_are_one_line(override, message):
    with pytest.raises(RegapError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_study_config("tiny-study", override)


def test_a_unit_started_under_another_preregistration_is_refused(tmp_path):
    from regap.study.unit import UnitRunner

    config = load_study_config("tiny-study")
    spec = next(u for u in plan_units(config) if u.name == "plain-s0")
    first = UnitRunner(config, spec, tmp_path, tmp_path / "work", "float32", log=lambda _: None,
                       preregistration="a" * 64)
    first.check_preregistration()
    first.check_preregistration()  # the same one again: fine
    changed = UnitRunner(config, spec, tmp_path, tmp_path / "work", "float32", log=lambda _: None,
                         preregistration="b" * 64)
    with pytest.raises(RegapError, match="started under another pre-registration"):
        changed.check_preregistration()


@pytest.mark.slow
def test_a_preregistered_study_reports_its_primary_endpoints_and_catches_a_changed_preregistration(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "PREREGISTRATION.md").write_text("# P1-P3 as in the config\n")
    args = ["study", "--fast", "--out", str(out), "preregistration=PREREGISTRATION.md", "primary.arm=regap-l1",
            "primary.image_conditions=[blank,noise,natural]", "moca=false", "defenses.plain=[]", "defenses.regap=[]"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    sha = file_sha256(out / "PREREGISTRATION.md")
    assert summary["preregistration"]["sha256"] == sha
    assert all(json.loads((out / "units" / f"{u}.json").read_text())["preregistration_sha256"] == sha
               for u in summary["units"])
    endpoints = summary["results"]["primary"]["endpoints"]
    assert set(endpoints) == {"P1", "P2", "P3"} and all(len(e["per_seed"]) == 2 for e in endpoints.values())
    assert endpoints["P3"]["margin"] == -0.05
    assert "Primary endpoints (pre-registered)" in (out / "report.md").read_text()
    (out / "PREREGISTRATION.md").write_text("# P1-P3, edited after the runs\n")
    assert main(args + ["--no-run"]) == 2
    assert "not run under this study's pre-registration" in capsys.readouterr().err
    (out / "units" / "plain-s1.json").unlink()
    assert main(args + ["--unit", "plain-s1"]) == 2  # its work folder records the first pre-registration


def test_sweep_points_become_evaluation_units_once_each():
    config = load_study_config("tiny-study", ["sweeps={cmrm: {alpha: [0.01, 0.1, 0.10]}, layer0-align: {strength: [0.5]}}",
                                              "defenses.plain=[cmrm:alpha=0.01, ecso]"])
    names = [u.name for u in plan_units(config) if u.seed == 0 and u.defense is not None]
    plain = [n for n in names if n.startswith("plain+")]
    assert plain == ["plain+cmrm:alpha=0.01-s0", "plain+ecso-s0", "plain+cmrm:alpha=0.1-s0",
                     "plain+layer0-align:strength=0.5-s0"]  # 0.1 and 0.10 are one unit, as are the two α = 0.01


@pytest.mark.parametrize("override, message", [
    (["sweeps={layer0-align: {strength: [1.5]}}"], r"outside its range \[0, 1\]"),
    (["sweeps={cmrm: {alpha: [-0.1]}}"], "outside its range"),
    (["sweeps={ecso: {strength: [0.5]}}"], "sweeps"),
    (["sweeps={cmrm: {alpha: 0.1}}"], r"'sweeps\.cmrm\.alpha' in override .* must be a list of numbers"),
    (["sweeps={regap: {lambda: [0.1]}}"], r"sweeps\.regap: ReGap is trained.*`lambdas`"),
])
def test_a_bad_sweep_point_is_one_line_naming_the_range(override, message):
    with pytest.raises(RegapError, match=message):
        load_study_config("tiny-study", override)


def test_the_fast_study_estimates_minutes_not_an_hour():
    """--fast units take seconds: its estimate must not quote the shipped config's hour."""
    from regap.study.fast import FAST_OVERRIDES
    from regap.study.run import Study
    from regap.study.units import plan_units

    config = load_study_config("tiny-study", FAST_OVERRIDES)
    study = Study(config, Path("/nonexistent-out"), progress=False)
    line = study.estimate(plan_units(config))[0]
    minutes = float(re.search(r"about (\d+(?:\.\d+)?) min", line).group(1))
    assert minutes <= 5, line


@pytest.mark.slow
def test_a_study_without_safety_reports_qa_and_the_gap_only(fast_study, tmp_path):
    """A utility-side check (`evaluations: [gap, utility]`, the λ check) has no unsafe rate and no judge
    agreement: its report shows QA and the gap, and draws no safety figure (it used to fail formatting
    the judges' agreement, None)."""
    from regap.study.study_report import write_report

    summary = json.loads((fast_study / "summary.json").read_text())
    for entry in summary["results"]["arms"].values():
        entry.update(unsafe={}, refused={}, over_refusal={})
    for pair in summary["judge_agreement"]["pairs"]:
        pair.update(n=0, agreement=None, kappa=None)
    summary["config"]["evaluations"] = ["gap", "utility"]
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "unsafe_by_arm.png").write_bytes(b"from an earlier report")
    write_report(tmp_path, summary, [])
    markdown = (tmp_path / "report.md").read_text()
    assert "Safety was not measured in this study (its evaluations: gap, utility)" in markdown
    assert "| regap-l1 | " in markdown.split("## Held-out QA accuracy", 1)[1].split("## The gap", 1)[0]
    assert "## Unsafe rate" not in markdown and "## Judges" not in markdown and "four claims" not in markdown
    assert "unsafe_by_arm" not in markdown
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == ["gap_by_arm.png", "learning_curve.png"]
