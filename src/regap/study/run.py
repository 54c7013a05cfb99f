"""`regap study`: run the units that are not summarised yet, then aggregate every unit that is.

Layout of OUT (default `results/tiny-study`):
* `units/UNIT.json`: one small summary per (seed, arm) unit, and `units/backbone.json` (the LLM
  before stage 2, text only: the same model for every unit, so it runs once);
* `summary.json`, `report.md`, `report.html` and `figures/`: the aggregate over the units present;
* `work/`: weights, generations and caches (large; not meant for git), with step markers, so an
  interrupted unit continues from its last finished step.

A unit whose summary exists with the current configuration is skipped, so the study can be run
unit by unit (`--unit NAME`) over several sittings, or by several processes at once (each unit
holds a lock on its work folder; a unit in use by another process is skipped, not waited for).
The statistics use whatever units exist and say how many seeds each arm has."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from regap.errors import RegapError
from regap.files import write_json_atomic
from regap.study.config import StudyConfig, study_arms
from regap.study.steps import StepMarkers
from regap.study.records import safety_record
from regap.study.unit import UnitRunner, unit_config_hash
from regap.study.units import UnitSpec, is_defended, plan_units, planned_seeds


#: How many of the most recently created timed units an estimate reads (see `Study.minutes_per_unit`).
RECENT_UNITS = 3


def _recent_median(timed: list[tuple[str, float]]) -> tuple[int, float]:
    """(how many, median minutes) of the `RECENT_UNITS` latest (created_utc, minutes) pairs."""
    recent = [minutes for _, minutes in sorted(timed)[-RECENT_UNITS:]]
    return len(recent), statistics.median(recent)


def read_summary(path: Path) -> dict[str, Any] | None:
    """A unit summary as a dict, or None when it is missing or damaged (empty, binary, truncated, not an
    object): a damaged file is never a traceback; the statistics leave it out with a note."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _console_log(progress: bool) -> Callable[[str], None]:
    def log(text: str) -> None:
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold cyan]study[/] {time.strftime('%H:%M:%S')} {text}")

    return log


class Study:
    def __init__(self, config: StudyConfig, out: Path, work: Path | None = None, progress: bool = True) -> None:
        from regap.precision import resolve_dtype

        self.config, self.out, self.progress = config, Path(out), progress
        self.work = Path(work) if work is not None else self.out / "work"
        self.log = _console_log(progress)
        self.dtype = str(resolve_dtype(config.dtype, "cuda" if torch.cuda.is_available() else "cpu").dtype
                         ).removeprefix("torch.")
        self.markers = StepMarkers(self.work / ".steps")
        self.config_hash = unit_config_hash(config)

    @property
    def preregistration(self) -> str | None:
        """The sha256 of the study's pre-registration (`OUT/<preregistration>`), None for an exploratory
        study; a study that names one that does not exist is refused before any unit runs."""
        if self.config.preregistration is None:
            return None
        from regap.files import file_sha256

        path = self.out / self.config.preregistration
        if not path.is_file():
            raise RegapError(f"the study names a pre-registration, {path}, that does not exist: write and commit it "
                             "before any unit runs (docs/study.md, 'Pre-registration')")
        return file_sha256(path)

    # ---- planning ----------------------------------------------------------------------------------
    def summary_path(self, name: str) -> Path:
        return self.out / "units" / f"{name}.json"

    def summarised(self, spec: UnitSpec) -> bool:
        data = read_summary(self.summary_path(spec.name))
        return data is not None and data.get("config_hash") == self.config_hash

    def has_backbone(self) -> bool:
        """Whether the study measures the `backbone` condition: a study whose units measure no safety
        (`evaluations` without `safety`) has no backbone to compare with."""
        return "backbone" in self.config.safety.conditions and "safety" in self.config.evaluations

    def backbone_due(self) -> bool:
        """Whether the `backbone` condition (run once per study, like a unit) still has to run."""
        if not self.has_backbone():
            return False
        data = read_summary(self.summary_path("backbone"))
        return data is None or data.get("config_hash") != self.config_hash

    def trained_runner(self) -> UnitRunner | None:
        """A runner of any unit whose final model exists (the backbone is read from it), or None."""
        for spec in plan_units(self.config):
            if spec.defense is None and (self.work / "units" / spec.name / "stage2" / "projector.safetensors").is_file():
                return self.runner(spec)
        return None

    def todo(self, only: list[str] | None = None) -> list[UnitSpec]:
        units = plan_units(self.config)
        if only:
            names = {u.name for u in units}
            unknown = [n for n in only if n not in names]
            if unknown:
                raise RegapError(f"--unit: unknown unit(s) {', '.join(unknown)}; this study has: "
                                 f"{', '.join(sorted(names))}")
            units = [u for u in units if u.name in only]
        return [u for u in units if not self.summarised(u)]

    def runner(self, spec: UnitSpec, preregistration: str | None = None) -> UnitRunner:
        return UnitRunner(self.config, spec, self.out, self.work, self.dtype, self.log, self.progress, preregistration)

    def minutes_per_unit(self, training: bool = True) -> tuple[float, str]:
        """The median wall time of the units of this kind summarised so far in this dtype, else the
        config's estimate. A training unit trains both stages and evaluates; an evaluation unit (a
        defense on a trained arm) only evaluates, so the two kinds are timed apart.

        Training units of another recipe (config hash) count too, with their training and learning-curve
        phases scaled to this config's steps, batch and checkpoints: a four-times-longer recipe must not
        be estimated at the old recipe's time. With no evaluation unit timed, the evaluation phases of this
        recipe's training units (gap, safety, utility) stand in: not the config's training-sized estimate.

        Only the `RECENT_UNITS` most recently created units of each source count: a code change that makes
        a phase faster (the LM-head fix of 2026-11-29 made evaluation 3.5x faster) keeps the recipe's hash, and a
        median over every unit ever run would keep quoting the old code's time."""
        same: list[tuple[str, float]] = []
        scaled: list[tuple[str, float]] = []
        evaluations_of_training: list[tuple[str, float]] = []
        for path in (self.out / "units").glob("*.json"):
            data = read_summary(path)
            if data is None:
                continue
            if (data.get("status") != "completed" or data.get("dtype") != self.dtype
                    or not data.get("timings_seconds") or data.get("arm") in (None, "backbone")):
                continue
            created = str((data.get("provenance") or {}).get("created_utc") or "")
            if is_defended(data["arm"]) == training:
                if not training and data.get("config_hash") == self.config_hash:  # its evaluation phases
                    evaluations_of_training.append((created, sum(v for k, v in data["timings_seconds"].items()
                                                                 if k not in ("stage1", "stage2", "curve")) / 60))
                continue
            if data.get("config_hash") == self.config_hash:
                same.append((created, sum(data["timings_seconds"].values()) / 60))
            elif (minutes := self._rescaled_minutes(data)) is not None:
                scaled.append((created, minutes))
        kind = "training" if training else "evaluation"
        if same:
            n, minutes = _recent_median(same)
            return minutes, f"median of the {n} latest {kind} unit(s) run here in {self.dtype}"
        if scaled:
            how = ", training and curve scaled to this recipe's steps and batch" if training else ""
            n, minutes = _recent_median(scaled)
            return minutes, f"median of the {n} latest {kind} unit(s) of another recipe run here in {self.dtype}{how}"
        if evaluations_of_training:  # an evaluation unit runs what a training unit runs after training
            n, minutes = _recent_median(evaluations_of_training)
            return minutes, f"the evaluation phases of the {n} latest training unit(s) run here in {self.dtype}"
        if not training:
            return self.config.minutes_per_evaluation_unit, "the config's estimate (no unit timed yet)"
        return self.config.minutes_per_unit, "the config's estimate (no unit timed yet)"

    def _rescaled_minutes(self, unit: dict[str, Any]) -> float | None:
        """A unit's wall time had it run this config's stage lengths; None when its recipe is not recorded."""
        recipe = (unit.get("provenance") or {}).get("study") or {}
        seconds = 0.0
        checkpoints_then = checkpoints_now = 0
        for phase, value in unit["timings_seconds"].items():
            stage = phase if phase in ("stage1", "stage2") else None
            if stage is None:
                seconds += value if phase != "curve" else 0.0
                continue
            then, now = recipe.get(stage), getattr(self.config, stage)
            if not isinstance(then, dict) or not then.get("steps") or not then.get("global_batch"):
                return None
            seconds += value * (now.steps * now.global_batch) / (then["steps"] * then["global_batch"])
            checkpoints_then += then["steps"] // max(int(then.get("save_every") or then["steps"]), 1)
            checkpoints_now += now.steps // max(now.save_every, 1)
        curve = unit["timings_seconds"].get("curve", 0.0)
        if curve and checkpoints_then:
            seconds += curve * checkpoints_now / checkpoints_then
        return seconds / 60

    def estimate(self, units: list[UnitSpec], progress: dict[str, str | None] | None = None) -> list[str]:
        """The time the run is expected to take, and a warning when it exceeds `budget_minutes`.
        `progress` (unit name -> `training_progress()`) spares reading checkpoints a caller already read."""
        lines, total = [], 0.0
        for training in (True, False):
            n = sum((u.defense is None) == training for u in units)
            if n:
                minutes, how = self.minutes_per_unit(training)
                total += minutes * n
                lines.append(f"{n} {'training' if training else 'evaluation'} unit(s): {minutes:.1f} min each "
                             f"({how})")
        lines.insert(0, f"{len(units)} unit(s) to run: about {total:.0f} min; dtype {self.dtype}")
        if progress is None:
            progress = {u.name: self.runner(u).training_progress() for u in units if u.defense is None}
        started = sum(u.defense is None and progress.get(u.name) is not None for u in units)
        if started:
            lines.append(f"{started} training unit(s) already started: counted whole, so the estimate is high "
                         "(--plan shows how far each got)")
        budget = self.config.budget_minutes
        if budget is not None and total > budget:
            lines.append(f"warning: that exceeds budget_minutes={budget:g}; run it over several sittings "
                         "(--max-units N, or --unit NAME; finished units are kept)")
        return lines

    # ---- running -----------------------------------------------------------------------------------
    def data(self) -> None:
        """The synthetic data every unit trains on; processes starting together wait for one another."""
        from filelock import FileLock

        from regap.data.synth import generate_synthetic

        c = self.config.data
        folder = self.work / "data"
        self.work.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.work / ".data.lock")):
            params = [c.synth_n, c.synth_seed] + ([c.conversations] if c.conversations != "sampled" else [])
            self.markers.run("data", params,
                             lambda: generate_synthetic(folder, c.synth_n, seed=c.synth_seed, image_size=224,
                                                        conversations=c.conversations, overwrite=True))

    def backbone(self, runner: UnitRunner) -> None:
        """The `backbone` condition once, on any unit's stage-2 model (its adapter disabled)."""
        if not self.backbone_due():
            return
        path = self.summary_path("backbone")
        from regap.safety.runner import SafetyRun, run_safety

        c = self.config.safety
        folder = self.work / "backbone"
        self.log("backbone (the LLM before stage 2, text only)")
        run = SafetyRun(model=f"{self.config.model} (LLM before stage 2)", out=folder,
                        prompts=["starter-harmful", "starter-benign"], conditions=["backbone"], judges=c.judges,
                        source_limits=c.source_limits(), judge_options=c.judge_options,
                        max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                        dtype=self.dtype, seed=0)
        started = time.time()
        try:
            run_safety(run, progress=self.progress, model=runner.final_model())
        except RegapError as exc:
            if "in use by another regap run" not in str(exc):
                raise
            self.log("backbone: being run by another process; skipped here")
            return
        from regap.provenance import provenance

        from regap.study.answers import answers_path, safety_answers, write_answers

        answers = answers_path(self.out / "units", "backbone")
        write_answers(answers, safety_answers(folder))
        write_json_atomic(path, {"format": "regap-study-unit/1", "unit": "backbone", "arm": "backbone",
                                 "config_hash": self.config_hash, "dtype": self.dtype, "status": "completed",
                                 "model_from": runner.spec.name, "answers": answers.name,
                                 **({"preregistration_sha256": runner.preregistration} if runner.preregistration
                                    else {}),
                                 "safety": {"backbone": safety_record(folder, c.judges)},
                                 "timings_seconds": {"backbone": round(time.time() - started, 1)},
                                 "provenance": provenance(command="regap study", unit="backbone")})

    def run(self, only: list[str] | None = None, max_units: int | None = None) -> list[str]:
        """Run the missing units (all, or `only`); returns the names run."""
        todo = self.todo(only)
        if max_units is not None:
            todo = todo[:max_units]
        for line in self.estimate(todo):
            self.log(line)
        if not todo:
            self._backbone_if_due()
            return []
        preregistration = self.preregistration  # checked before anything runs
        self.data()
        from regap.run_lock import exclusive_out

        done = []
        for spec in todo:
            try:
                with exclusive_out(self.work / "units" / spec.name, flag="unit"):
                    if self.summarised(spec):  # finished by another process meanwhile
                        continue
                    runner = self.runner(spec, preregistration)
                    self.log(f"unit {spec.name} ({len(done) + 1}/{len(todo)})")
                    summary = runner.run()
                    if summary["status"] == "completed":
                        self.backbone(runner)
                    runner.release()
            except RegapError as exc:
                if "in use by another regap run" not in str(exc):
                    raise
                self.log(f"unit {spec.name}: being run by another process; skipped here")
                continue
            done.append(spec.name)
        self._backbone_if_due()
        return done

    def _backbone_if_due(self) -> None:
        """The backbone like any unit: run when its summary is missing (lost, or stopped before it was
        written), on the model of any trained unit; said when no trained model exists yet."""
        if not self.backbone_due():
            return
        runner = self.trained_runner()
        if runner is None:
            self.log("backbone: waits for a trained unit (it runs on any unit's final model)")
            return
        from regap.run_lock import exclusive_out

        try:
            with exclusive_out(self.work / "units" / runner.spec.name, flag="unit"):
                self.backbone(runner)
        except RegapError as exc:
            if "in use by another regap run" not in str(exc):
                raise
            self.log("backbone: its model's unit is in use by another process; skipped here")
        finally:
            runner.release()

    # ---- aggregating -------------------------------------------------------------------------------
    def aggregate(self) -> dict[str, Any]:
        """summary.json and the report from the unit summaries present (one process at a time)."""
        from filelock import FileLock

        self.out.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.out / ".aggregate.lock")):
            return self._aggregate()

    def _aggregate(self) -> dict[str, Any]:
        from regap.provenance import provenance
        from regap.study.frontier import recommendations
        from regap.study.selection import choose_lambda
        from regap.study.stats import aggregate, judge_agreement, load_units

        units, notes = load_units(self.out)
        registered = self.preregistration if self.config.preregistration else None
        if registered is not None:
            kept = [u for u in units if u.get("preregistration_sha256") == registered]
            notes += [f"{u['unit']}: not run under this study's pre-registration (sha256 "
                      f"{str(u.get('preregistration_sha256'))[:12]}, now {registered[:12]}); left out"
                      for u in units if u not in kept]
            units = kept
        if not units:
            raise RegapError(f"{self.out / 'units'}: no finished unit to aggregate yet"
                             + (f" ({len(notes)} left out; e.g. {notes[0]})" if notes else ""))
        backbone = read_summary(self.summary_path("backbone"))
        if backbone is not None and not isinstance(backbone.get("safety", {}).get("backbone"), dict):
            notes.append("backbone.json: damaged (no backbone verdicts); left out")
            backbone = None
        c = self.config
        if backbone is None and "backbone" in c.safety.conditions and "safety" in c.evaluations:
            notes.append("backbone (the LLM before stage 2, text only) not run yet: claim (a)'s image − backbone "
                         "is missing until it runs (rerun the study)")
        planned = plan_units(c)
        present = {u["unit"] for u in units}
        from regap.study.answers import answers_path

        without = sorted(u["unit"] for u in units if not answers_path(self.out / "units", u["unit"]).is_file())
        if without:
            notes.append(f"{len(without)} of {len(units)} unit(s) kept no answers (verdicts only; they cannot be "
                         f"re-judged or audited): {', '.join(without)}")
        missing = [u.name for u in planned if u.name not in present]
        if missing:
            notes.append(f"{len(missing)} of {len(planned)} planned unit(s) not run yet: {', '.join(missing)}")
        stats = {judge: aggregate(units, backbone, judge, study_arms(c), c.safety.conditions, c.stats.n_boot,
                                  c.stats.level, primary=c.primary) for judge in c.safety.judges}
        summary = {
            "study": c.name, "config": c.to_dict(), "config_hash": self.config_hash, "dtype": self.dtype,
            "preregistration": None if registered is None else {"path": c.preregistration, "sha256": registered},
            "units": sorted(present), "units_planned": [u.name for u in planned], "notes": notes,
            "primary_judge": c.safety.primary_judge,
            "results": stats[c.safety.primary_judge],
            "best_lambda": choose_lambda(stats[c.safety.primary_judge], planned_seeds(planned), c.regap_lambda),
            "frontier": recommendations(stats[c.safety.primary_judge]),
            "other_judges": {j: {"arms": {a: v["unsafe"] for a, v in s["arms"].items()}, "claims": s["claims"]}
                             for j, s in stats.items() if j != c.safety.primary_judge},
            "judge_agreement": judge_agreement(units, c.safety.judges),
            "utility": {u["unit"]: {arm: {k: v for k, v in rec.items() if k != "examples"} | {
                "qa": {k: v for k, v in rec["qa"].items() if k not in ("items", "correct")}}
                for arm, rec in u.get("utility", {}).items()} for u in units},
            "curves": {u["unit"]: u["curve"] for u in units if "curve" in u},
            "timings_minutes": {u["unit"]: round(sum(u["timings_seconds"].values()) / 60, 1) for u in units},
            "provenance": provenance(command="regap study", study=c.to_dict()),
        }
        write_json_atomic(self.out / "summary.json", summary)
        from regap.study.study_report import write_report

        write_report(self.out, summary, units)
        return summary


def run_study(config: StudyConfig, out: str | Path, *, work: str | Path | None = None, only: list[str] | None = None,
              max_units: int | None = None, run: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run what is missing (unless `run` is False) and aggregate; returns the summary."""
    study = Study(config, Path(out), Path(work) if work else None, progress)
    if run:
        study.run(only, max_units)
    return study.aggregate()
