"""One study unit, end to end: stage 1 → stage 2 → gap, safety, utility (and the defense arms on
the same model) → a small summary, `OUT/units/UNIT.json`, that the statistics read.

Heavy outputs (weights, generations, caches) go to the unit's work folder; each step leaves a
marker there, so an interrupted unit continues from its last finished step. A run whose loss
becomes NaN/inf is summarised with status `diverged` and left out of the statistics (the report
says so); it is never dropped silently."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from regap.errors import RegapError
from regap.files import write_json_atomic
from regap.study.config import StudyConfig
from regap.study.steps import StepMarkers
from regap.study.records import gap_record, safety_record, training_data_note, training_record, utility_record
from regap.study.units import UnitSpec

#: The run folder (in a unit's work folder) of XSTest's safe prompts, and its key in the unit summary.
XSTEST_RUN = "safety_xstest"
#: The study data file each stage trains on.
TRAINING_FILES = {1: "captions.json", 2: "instructions.json"}
SUMMARY_FORMAT = "regap-study-unit/1"


class UnitRunner:
    """Runs one unit in `work/units/NAME`; `summary()` writes `OUT/units/NAME.json`."""

    def __init__(self, config: StudyConfig, spec: UnitSpec, out: Path, work: Path, dtype: str,
                 log: Callable[[str], None], progress: bool = False, preregistration: str | None = None) -> None:
        self.config, self.spec, self.out, self.dtype, self.log, self.progress = config, spec, out, dtype, log, progress
        self.preregistration = preregistration  # the sha256 of the study's pre-registration, if it has one
        self.work = work / "units" / spec.trained_name  # a defense unit evaluates its arm's models
        self.eval_dir = self.work if spec.defense is None else work / "units" / spec.name
        self.data = work / "data"
        self.markers = StepMarkers(self.work / ".steps")  # training steps: shared with the arm's defense units
        self.eval_markers = self.markers if spec.defense is None else StepMarkers(self.eval_dir / ".steps")
        self.notes: list[str] = []
        self._model = None
        self._data_sha: dict[Path, str] = {}
        #: a stage-2 ablation's stage 1 is plain's of the same seed: trained (or found) through plain's runner
        self.stage1_runner = None if spec.stage1_from is None else UnitRunner(
            config, UnitSpec("plain", spec.seed, 0.0), out, work, dtype, log, progress, preregistration)

    def stage_folder(self, stage: int) -> Path:
        """Where a stage's output lives: this unit's work folder, or plain's for a reused stage 1."""
        if stage == 1 and self.stage1_runner is not None:
            return self.stage1_runner.stage_folder(1)
        return self.work / f"stage{stage}"

    # ---- training ---------------------------------------------------------------------------------
    def _train_overrides(self, stage: int) -> list[str]:
        c, s = self.config, self.spec
        if stage == 1 and self.stage1_runner is not None:  # the very overrides of plain's stage 1
            return self.stage1_runner._train_overrides(1)
        spec = c.stage1 if stage == 1 else c.stage2
        overrides = [
            f"model={c.model}", f"dtype={self.dtype}", f"data.json={self.data / TRAINING_FILES[stage]}",
            f"max_steps={spec.steps}", f"global_batch_size={spec.global_batch}",
            f"per_device_batch_size={spec.per_device_batch}", f"save_every={spec.save_every}",
            f"keep_checkpoints={spec.steps // spec.save_every + 1}", f"seed={s.seed}",
            f"moca.enabled={str(s.moca).lower()}", "observe.progress=" + str(self.progress).lower(),
        ]
        if c.attn_implementation is not None:
            overrides.append(f"attn_implementation={c.attn_implementation}")
        if spec.lr is not None:
            overrides.append(f"lr={spec.lr}")
        if spec.projector_lr is not None:
            overrides.append(f"projector_lr={spec.projector_lr}")
        if spec.scenes is not None:
            overrides.append(f"data.max_items={spec.scenes}")
        if stage == 1:
            overrides += self._regap_overrides(1)
        else:
            overrides += [f"projector={self.stage_folder(1)}", *self._regap_overrides(2), f"lora.r={spec.lora_r}",
                          f"lora.alpha={spec.lora_alpha}"]
            if spec.lora_targets:
                overrides.append("lora.target_modules=[" + ",".join(spec.lora_targets) + "]")
        return overrides

    def _regap_overrides(self, stage: int) -> list[str]:
        """ReGap's settings in a stage: the unit's λ in stage 1 and off in stage 2; an ablation's λ, layer and
        distance in the stage it regularises, and off in the other."""
        from regap.study.config import VARIANT_KEYS

        s = self.spec
        if s.variant is None:
            return [f"regap.lam={s.lam}"] if stage == 1 else ["regap.lam=0"]
        if stage != s.regap_stage:
            return ["regap.lam=0"]
        variant = {**VARIANT_KEYS, **dict(s.variant or ())}
        out = [f"regap.lam={s.lam}", f"regap.layer={variant['layer']}", f"regap.distance={variant['distance']}"]
        if stage == 2:  # the main arm's other ReGap settings (warm-up, pooling) come from the stage-1 config
            from regap.config import read_yaml
            from regap.train.config import shipped_configs

            main = read_yaml(shipped_configs()["tiny-stage1"]).get("regap") or {}
            out += [f"regap.{k}={v}" for k, v in main.items() if k not in ("lam", *VARIANT_KEYS)]
        return out

    def train(self, stage: int) -> None:
        from regap.train import load_config, read_metrics, train, training_seconds

        if stage == 1 and self.stage1_runner is not None:
            self._train_plain_stage1()
            return
        overrides = self._train_overrides(stage)
        folder = self.work / f"stage{stage}"

        def action() -> None:
            self.log(f"{self.spec.name}: stage {stage}")
            config = load_config(f"tiny-stage{stage}", overrides, stage=stage)
            result = train(config, folder, resume=True)
            if result.status != "completed":
                raise RegapError(f"{self.spec.name}: stage {stage} stopped at step {result.step}: {result.status}")

        def seconds() -> float:  # every sitting of the stage, not only the one that finished it
            return training_seconds(read_metrics(folder / "metrics.jsonl"))

        self.markers.run(f"stage{stage}", self.stage_marker_params(stage), action, seconds=seconds,
                         legacy=self.legacy_stage_marker_params(stage))

    def _train_plain_stage1(self) -> None:
        """A stage-2 ablation's stage 1: plain's, through plain's own step marker, so it trains once for both
        units. Training it here takes plain's unit lock (a plain unit running elsewhere makes this unit wait
        for a later sitting, as any unit in use does); a finished one is only read."""
        from regap.run_lock import exclusive_out

        plain = self.stage1_runner
        assert plain is not None
        if plain.markers.done("stage1", plain.stage_marker_params(1), legacy=plain.legacy_stage_marker_params(1)):
            return
        self.log(f"{self.spec.name}: stage 1 is {plain.spec.name}'s (trained there)")
        with exclusive_out(plain.work, flag="unit"):
            plain.train(1)

    def stage_marker_params(self, stage: int) -> list[str]:
        """What a stage's step marker keys on: its training overrides but the progress display, so that
        showing a progress bar or not never redoes a stage (a stage trained elsewhere is adopted by
        writing this marker: docs/study.md). Paths are keyed by content (the data file's sha256; stage 2's
        projector is this unit's own stage 1), so a study folder moved or copied elsewhere continues."""
        from regap.files import file_sha256

        params = []
        for override in self.legacy_stage_marker_params(stage):
            key, _, value = override.partition("=")
            if key == "data.json":
                path = Path(value)
                if path not in self._data_sha:
                    self._data_sha[path] = file_sha256(path) if path.is_file() else "missing"
                override = f"data.sha256={self._data_sha[path]}"
            elif key == "projector":  # this unit's stage 1, or the plain unit's it reuses
                override = "projector=stage1" if self.spec.stage1_from is None else \
                    f"projector={self.spec.stage1_from}/stage1"
            params.append(override)
        return params

    def legacy_stage_marker_params(self, stage: int) -> list[str]:
        """The marker key of studies run before markers were keyed by content (absolute paths): still
        accepted, so a unit trained then is not trained again."""
        return [o for o in self._train_overrides(stage) if not o.startswith("observe.progress=")]

    def training_progress(self) -> str | None:
        """How far earlier sittings took this unit's training (its arm's, for a defense unit), for
        `--plan`: a unit run over several sittings should say what is left; None when nothing started."""
        from regap.train.checkpoint import latest_checkpoint, read_state

        parts = []
        for stage, spec in ((1, self.config.stage1), (2, self.config.stage2)):
            runner = self.stage1_runner if stage == 1 and self.stage1_runner is not None else self
            whose = f" in {runner.spec.name}" if runner is not self else ""
            if runner.markers.done(f"stage{stage}", runner.stage_marker_params(stage),
                                   legacy=runner.legacy_stage_marker_params(stage)):
                parts.append(f"stage {stage} done{whose}")
                continue
            checkpoint = latest_checkpoint(runner.stage_folder(stage) / "checkpoints")
            if checkpoint is not None:
                try:
                    step = read_state(checkpoint)["step"]
                except (RegapError, KeyError):
                    step = "?"
                parts.append(f"stage {stage} checkpoint at step {step}/{spec.steps}{whose}")
            break
        return "; ".join(parts) or None

    # ---- models -----------------------------------------------------------------------------------
    def final_model(self):
        if self._model is None:
            from regap.models import load_trained

            self._model = load_trained(self.work / "stage2", dtype=self.dtype)
        return self._model

    def release(self) -> None:
        self._model = None

    # ---- evaluations ------------------------------------------------------------------------------
    def gap(self, sub: str, model_folder: Path, images: str, texts: str, pairs: int, per_pair: int,
            defenses: list[str] | None = None) -> None:
        from regap.safety.pairs import make_pairs
        from regap.gap.run import measure_to_folder

        c = self.config
        rest = [images, texts, pairs, per_pair, c.gap.n_boot, self.dtype, defenses or []]
        params = [self._relative(model_folder)] + rest  # relative: a moved study continues

        def action() -> None:
            from regap.models import load_trained

            model = self.final_model() if model_folder == self.work / "stage2" else load_trained(model_folder,
                                                                                                 dtype=self.dtype)
            pair_list = make_pairs(pairs, images=images, texts=texts, seed=c.data.synth_seed, texts_per_pair=per_pair)
            measure_to_folder(model, pair_list, self.eval_dir / sub, model_name=f"{c.model}/{self.spec.name}",
                              protocol="reference" if per_pair > 1 else "prompt", images=images, texts=texts,
                              texts_per_pair=per_pair, batch_size=8, n_boot=c.gap.n_boot, seed=self.spec.seed,
                              progress=self.progress, dtype_requested=c.dtype, defenses=defenses, tag=sub)

        self.eval_markers.run(sub, params, action, legacy=[str(model_folder)] + rest)

    def _relative(self, folder: Path) -> str:
        """A model folder relative to this unit's work folder (`stage2`), or to the units' folder for another
        unit's (`../plain-s0/stage1`)."""
        if folder.is_relative_to(self.work):
            return folder.relative_to(self.work).as_posix()
        return "../" + folder.relative_to(self.work.parent).as_posix()

    def safety(self, sub: str, conditions: list[str], defenses: list[str]) -> None:
        c = self.config.safety
        params = [conditions, defenses, c.judges, c.source_limits(), c.max_new_tokens, self.dtype]
        params += [c.judge_options] if c.judge_options else []  # without options: the key it always had
        self._safety_step(sub, params, f"safety {sub}", conditions, defenses,
                          prompts=["starter-harmful", "starter-benign"], source_limits=c.source_limits())

    def xstest(self, sub: str, conditions: list[str], defenses: list[str]) -> None:
        """XSTest's safe prompts under `conditions`: how often the model refuses a request that only sounds
        unsafe (the frontier's over-refusal column); judged like the safety run."""
        from regap.files import file_sha256

        c = self.config.safety
        path = xstest_file(c.xstest)
        params = [conditions, defenses, c.judges, file_sha256(path), c.max_new_tokens, self.dtype, c.judge_options]
        self._safety_step(sub, params, "XSTest safe prompts", conditions, defenses, prompts=[f"xstest:{path}"],
                          source_options={"xstest": {"label": "safe"}})

    def _safety_step(self, sub: str, params: list[Any], what: str, conditions: list[str], defenses: list[str],
                     **requests: Any) -> None:
        """A safety run of this unit's final model as a resumable step: the study's judges and decoding,
        the requests given by `requests` (`prompts` and their limits or loader options)."""
        from regap.safety.runner import SafetyRun, run_safety

        c = self.config.safety

        def action() -> None:
            self.log(f"{self.spec.name}: {what} ({', '.join(conditions)})")
            run = SafetyRun(model=str(self.work / "stage2"), out=self.eval_dir / sub, conditions=conditions,
                            judges=c.judges, judge_options=c.judge_options, max_new_tokens=c.max_new_tokens,
                            batch_size=c.batch_size, dtype=self.dtype, seed=self.spec.seed, defenses=defenses,
                            **requests)
            run_safety(run, progress=self.progress, model=self.final_model())

        self.eval_markers.run(sub, params, action)

    def utility(self, sub: str, defenses: list[str]) -> None:
        from regap.utility import UtilityRun, run_utility

        c = self.config.utility
        params = [c.tasks, c.scenes, c.refusal_limit, c.max_new_tokens, self.dtype, defenses]

        def action() -> None:
            self.log(f"{self.spec.name}: utility {sub}")
            model = self.final_model()
            run = UtilityRun(model=model.config.name, out=self.eval_dir / sub, n=c.scenes, seed=0,
                             max_new_tokens=c.max_new_tokens, refusal_limit=c.refusal_limit, dtype=self.dtype,
                             defenses=list(defenses), tasks=c.tasks)
            run_utility(run, progress=self.progress, model=model)

        self.eval_markers.run(sub, params, action)

    def curve(self) -> None:
        """QA accuracy at every kept checkpoint of both stages (the learning curve)."""
        from regap.study.curve import qa_curve

        c = self.config.curve
        checkpoints = [str(p) for stage in (1, 2) for p in sorted((self.work / f"stage{stage}" / "checkpoints").glob("step-*"))]
        params = [checkpoints, c.scenes, self.config.utility.max_new_tokens, self.dtype]
        self.markers.run("curve", params, lambda: qa_curve(self.work, c.scenes, self.config.utility.max_new_tokens,
                                                           self.dtype, self.work / "curve.json"))

    # ---- the whole unit ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from regap.train.step import NonFiniteLossError

        c, s = self.config, self.spec
        started = time.time()
        self.check_preregistration()
        try:
            self.train(1)
            self.train(2)
        except NonFiniteLossError as exc:
            self.notes.append(f"diverged: {exc}")
            return self.summary("diverged", started)
        for stage, name in TRAINING_FILES.items():
            note = training_data_note(stage, self.stage_folder(stage), self.data / name)
            if note is not None:
                self.notes.append(note)
        if s.defense is not None:  # an evaluation unit: the defense on this arm's final model
            self.gap("gap", self.work / "stage2", "scenes", "starter-benign", c.gap.pairs, c.gap.texts_per_pair,
                     defenses=[s.defense])
            self.safety("safety", list(c.defenses.conditions), [s.defense])
            image = [x for x in c.safety.xstest_conditions if x in c.defenses.conditions]
            if c.safety.xstest is not None and image:
                self.xstest(XSTEST_RUN, image, [s.defense])
            self.utility("utility", [s.defense])
            self.release()
            return self.summary("completed", started)
        wanted = set(c.evaluations)
        if "curve" in wanted and s.seed in c.curve.seeds and s.variant is None:  # first: does the model see at all
            self.curve()
        if "gap" in wanted:
            self.gap("gap", self.work / "stage2", "scenes", "starter-benign", c.gap.pairs, c.gap.texts_per_pair)
            self.gap("gap_attack", self.work / "stage2", "blank", "starter-harmful", c.gap.attack_pairs, 1)
            self.gap("gap_stage1", self.stage_folder(1), "scenes", "starter-benign", c.gap.pairs,
                     c.gap.texts_per_pair)
        if "safety" in wanted:
            self.safety("safety", [x for x in c.safety.conditions if x != "backbone"], [])
            if c.safety.xstest is not None:
                self.xstest(XSTEST_RUN, list(c.safety.xstest_conditions), [])
        if "utility" in wanted:
            self.utility("utility", [])
        self.release()
        return self.summary("completed", started)

    def check_preregistration(self) -> None:
        """A unit of a pre-registered study runs under one pre-registration only: the first run records its
        sha256 in the unit's work folder, and a later run under another one is refused (its evaluations
        would not be the ones registered)."""
        if self.preregistration is None:
            return
        record = self.eval_dir / ".steps" / "preregistration.json"
        if record.is_file():
            try:
                earlier = json.loads(record.read_text()).get("sha256")
            except (OSError, ValueError, AttributeError):
                earlier = None
            if earlier != self.preregistration:
                raise RegapError(f"unit {self.spec.name} started under another pre-registration (sha256 "
                                 f"{str(earlier)[:12]}), not the study's current one ({self.preregistration[:12]}): "
                                 "refused; restore the pre-registration it ran under, or run a new study")
            return
        from regap.files import write_json_atomic as write

        record.parent.mkdir(parents=True, exist_ok=True)
        write(record, {"sha256": self.preregistration})

    def write_answers(self) -> str:
        """Every answer of this unit's safety and utility runs beside its summary (`regap.study.answers`);
        returns the file's name, which the summary records."""
        from regap.study.answers import answers_path, safety_answers, utility_answers, write_answers

        path = answers_path(self.out / "units", self.spec.name)
        safety = [row for sub in ("safety", XSTEST_RUN) if (self.eval_dir / sub).is_dir()
                  for row in safety_answers(self.eval_dir / sub)]
        write_answers(path, safety + utility_answers(self.eval_dir / "utility"))
        return path.name

    def _timings(self) -> dict[str, float]:
        """This unit's steps: a defense unit's own evaluations (its arm's training is the arm's)."""
        if self.spec.defense is None:
            return dict(self.markers.timings)
        return dict(self.eval_markers.timings)

    def summary(self, status: str, started: float) -> dict[str, Any]:
        from regap.provenance import json_hash, provenance

        s = self.spec
        record: dict[str, Any] = {
            "format": SUMMARY_FORMAT, "unit": s.name, "arm": s.arm, "seed": s.seed, "lambda": s.lam, "moca": s.moca,
            "status": status, "notes": self.notes, "config_hash": unit_config_hash(self.config),
            "dtype": self.dtype, "training": {f"stage{k}": training_record(self.stage_folder(k)) for k in (1, 2)},
            "timings_seconds": self._timings(),
        }
        if status == "completed":
            wanted = set(self.config.evaluations) | ({"gap", "safety", "utility"} if s.defense else set())
            if "gap" in wanted:
                names = ("gap",) if s.defense is not None else ("gap", "gap_attack", "gap_stage1")
                record["gap"] = {name: gap_record(self.eval_dir / name) for name in names}
            if "safety" in wanted:
                record["safety"] = {s.arm: safety_record(self.eval_dir / "safety", self.config.safety.judges)}
                if (self.eval_dir / XSTEST_RUN / "results.jsonl").is_file():
                    record["xstest"] = {s.arm: safety_record(self.eval_dir / XSTEST_RUN, self.config.safety.judges)}
            if "utility" in wanted:
                record["utility"] = {s.arm: utility_record(self.eval_dir / "utility")}
            record["answers"] = self.write_answers()
            if s.defense is None and (self.work / "curve.json").is_file():
                record["curve"] = json.loads((self.work / "curve.json").read_text())
        if self.preregistration is not None:
            record["preregistration_sha256"] = self.preregistration
        if s.defense is not None:
            record["defense"], record["evaluates"] = s.defense, s.trained_name
        if s.variant is not None:  # an exploratory ablation of the main ReGap arm
            record["variant"] = dict(s.variant)
            if s.stage1_from is not None:
                record["stage1_from"] = s.stage1_from  # its stage 1 (and that stage's time) is that unit's
        record["wall_seconds_this_run"] = round(time.time() - started, 1)
        record["provenance"] = provenance(command="regap study", unit=s.name, study=self.config.to_dict(),
                                          study_hash=json_hash(self.config.to_dict()))
        (self.out / "units").mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "units" / f"{s.name}.json", record)
        return record


#: Keys that did not exist when the first units were run, with their defaults: left out of the hash
#: while at the default.
LATER_KEYS = {"": {"attn_implementation": None, "evaluations": ["curve", "gap", "safety", "utility"]},
              "stage1": {"projector_lr": None, "scenes": None}, "stage2": {"projector_lr": None, "scenes": None},
              "data": {"conversations": "sampled"},
              "safety": {"judge_options": {}, "xstest": None, "xstest_conditions": ["text", "blank"]}}


def unit_config_hash(config: StudyConfig) -> str:
    """What makes two units comparable: everything that changes what a unit computes. The lists of arms
    (seeds, exploratory seeds, λ values, the MoCa switch, the main λ, the defense arms) and the bookkeeping
    keys are left out, so a study can gain an arm without orphaning the units it already has. Keys added after units were
    run (`attn_implementation`, `stageN.projector_lr`, `stageN.scenes`, `data.conversations`) count only when set away from
    their default, for the same reason. `sweeps` and `ablations` list arms, so they are left out too."""
    from regap.provenance import json_hash

    data = config.to_dict()
    for section, defaults in LATER_KEYS.items():
        where = data[section] if section else data
        for key, default in defaults.items():
            if where.get(key) == default:
                where.pop(key, None)
    for key in ("seeds", "exploratory_seeds", "lambdas", "moca", "regap_lambda", "minutes_per_unit",
                "minutes_per_evaluation_unit", "budget_minutes", "stats", "curve", "name", "preregistration", "primary"):
        data.pop(key, None)
    data["defenses"] = {k: v for k, v in data["defenses"].items() if k not in ("plain", "regap")}
    data.pop("sweeps", None)  # arms, like the defense lists: a study may gain sweep points
    data.pop("ablations", None)  # arms too: the variant and its λ are in each ablation unit's name
    if data["safety"].get("xstest") is not None:  # where the file lives is not what a unit computes; its
        data["safety"]["xstest"] = "measured"     # content keys the XSTest step's marker (a new file reruns it)
    return json_hash(data)


def xstest_file(spec: str | None) -> Path:
    """The XSTest prompts file of `safety.xstest` (the CSV, or the folder holding `xstest_prompts.csv`)."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        path = path / "xstest_prompts.csv"
    if not path.is_file():
        raise RegapError(f"safety.xstest: XSTest prompts file not found: {path}")
    return path
