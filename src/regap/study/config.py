"""The study's settings (`regap study CONFIG key=value ...`): a YAML file of nested sections,
checked key by key so a typo is a one-line error naming the key, not a silent default.

Shipped configs live in `regap/configs/study/` (`tiny-study`); see docs/study.md."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from regap import config as typed
from regap.errors import RegapError
from regap.models.attention import check_attention


#: A training unit's evaluations, in the order they run.
EVALUATIONS = ("curve", "gap", "safety", "utility")


@dataclass
class DataSpec:
    synth_n: int = 512  # synthetic scenes: captions for stage 1, instructions for stage 2 (same scenes)
    synth_seed: int = 0  # the data are the same for every unit; the unit seed varies training only
    conversations: str = "sampled"  # stage 2's instructions per scene: sampled (1-3 questions) | all (every question)


@dataclass
class StageSpec:
    steps: int = 64
    global_batch: int = 8
    per_device_batch: int = 4
    save_every: int = 16
    lr: float | None = None  # None: the shipped stage config's
    projector_lr: float | None = None  # None: the shipped stage config's (stage 2 trains the projector too)
    scenes: int | None = None  # None: every scene of `data`; N: the first N (prefix-stable, so N scenes are the same N)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None  # None: every linear layer of the LLM


@dataclass
class GapSpec:
    pairs: int = 32
    texts_per_pair: int = 5
    attack_pairs: int = 16
    n_boot: int = 300


@dataclass
class SafetySpec:
    harmful: int | None = None
    benign: int | None = None
    conditions: list[str] = field(default_factory=lambda: ["text", "backbone", "blank", "noise", "natural", "typo"])
    judges: list[str] = field(default_factory=lambda: ["relevance", "refusal-lexicon", "keyword"])
    primary_judge: str = "relevance"
    judge_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # judge -> options (e.g. a threshold)
    max_new_tokens: int = 16
    batch_size: int = 16
    #: XSTest's prompts file (`xstest_prompts.csv` or its folder; null: not measured): its 250 safe prompts
    #: are asked under `xstest_conditions` (a defense unit: the image ones among them), and their refusal
    #: rate is the over-refusal column of the frontier (exploratory)
    xstest: str | None = None
    xstest_conditions: list[str] = field(default_factory=lambda: ["text", "blank"])

    def source_limits(self) -> dict[str, int]:
        """`SafetyRun.source_limits`: the first N requests of a starter set (None: all of it)."""
        limits = {"starter-harmful": self.harmful, "starter-benign": self.benign}
        return {k: v for k, v in limits.items() if v is not None}


@dataclass
class UtilitySpec:
    #: over-refusal comes from the safety runs' benign requests (every condition, the primary judge)
    tasks: list[str] = field(default_factory=lambda: ["synthetic-qa", "synthetic-caption"])
    scenes: int = 40
    refusal_limit: int | None = None
    max_new_tokens: int = 16


@dataclass
class DefenseSpec:
    plain: list[str] = field(default_factory=lambda: ["cmrm", "layer0-align"])
    regap: list[str] = field(default_factory=lambda: ["cmrm"])
    conditions: list[str] = field(default_factory=lambda: ["blank", "noise", "natural", "typo"])


@dataclass
class CurveSpec:
    seeds: list[int] = field(default_factory=lambda: [0])
    scenes: int = 20


@dataclass
class PrimarySpec:
    """The pre-registered primary family (Holm-adjusted); `arm` null: no primary endpoints (exploratory).

    P1: `arm` − plain in the unsafe rate on harmful requests, pooled over `image_conditions`;
    P2: the interaction (`arm` − plain) x (image − text-only): is the effect specific to images?
    P3: non-inferiority of held-out QA accuracy, `arm` − plain > −`qa_margin` (one-sided)."""

    arm: str | None = None
    image_conditions: list[str] = field(default_factory=lambda: ["blank", "noise", "natural"])
    qa_margin: float = 0.05


#: The settings an ablation variant may change, in the order its arm name joins them, with the main ReGap
#: arm's value of each: a variant at these values is the main arm itself.
VARIANT_KEYS = {"layer": 0, "stage": 1, "distance": "centroid"}


@dataclass
class AblationSpec:
    """Exploratory ReGap ablations (the paper's: a later LLM layer, ReGap in stage 2, another distance).
    Each variant changes one or more `VARIANT_KEYS` of the main ReGap arm and trains, at `lam` (null:
    `regap_lambda`), a full unit on each of `seeds` (a subset of the study's). Empty `seeds` or `variants`:
    none. E.g. `{seeds: [0, 1], variants: [{layer: 6}, {stage: 2}, {distance: frechet}]}`."""

    seeds: list[int] = field(default_factory=list)
    lam: float | None = None
    variants: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StatsSpec:
    n_boot: int = 2000
    level: float = 0.95


@dataclass
class StudyConfig:
    name: str = "tiny-study"
    model: str = "tiny"
    dtype: str = "auto"
    attn_implementation: str | None = None  # the LLM's attention in both training stages (null: library default)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    #: the seeds of every arm other than plain and the main ReGap arm (the other λ values, MoCa, the defense
    #: and sweep arms), a subset of `seeds`: a confirmatory pair on five seeds with its exploratory arms on
    #: three (null: all of `seeds`; the ablations have `ablations.seeds`)
    exploratory_seeds: list[int] | None = None
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 1.0])
    regap_lambda: float = 0.1
    moca: bool = True
    data: DataSpec = field(default_factory=DataSpec)
    stage1: StageSpec = field(default_factory=StageSpec)
    stage2: StageSpec = field(default_factory=lambda: StageSpec(steps=96, save_every=24))
    gap: GapSpec = field(default_factory=GapSpec)
    safety: SafetySpec = field(default_factory=SafetySpec)
    utility: UtilitySpec = field(default_factory=UtilitySpec)
    defenses: DefenseSpec = field(default_factory=DefenseSpec)
    curve: CurveSpec = field(default_factory=CurveSpec)
    stats: StatsSpec = field(default_factory=StatsSpec)
    #: what a training unit evaluates after training (a utility-only check leaves safety unmeasured)
    #: a safety–utility frontier: inference-time methods on the plain arm's models at several strengths,
    #: `{method spec: {option: [values]}}`, e.g. `{cmrm: {alpha: [0.01, 0.1]}, "cmrm:level=sample": {alpha: [0.1]}}`
    sweeps: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    evaluations: list[str] = field(default_factory=lambda: list(EVALUATIONS))
    #: a confirmatory study's pre-registration, relative to OUT: it must exist before any unit runs, its
    #: sha256 goes into every unit, and a unit run under another one is refused (null: exploratory)
    preregistration: str | None = None
    primary: PrimarySpec = field(default_factory=PrimarySpec)
    #: exploratory ReGap variants (layer, stage, distance), trained after every other arm
    ablations: AblationSpec = field(default_factory=AblationSpec)
    minutes_per_unit: float = 25.0  # printed estimate of a training unit until units have been timed
    minutes_per_evaluation_unit: float = 10.0  # the same for a defense arm's unit (it trains nothing)
    budget_minutes: float | None = None  # a run estimated to take longer says so before it starts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def arm_seeds(self) -> list[int]:
        """The seeds of an arm outside the main pair (plain, `regap_lambda`): `exploratory_seeds`, else all."""
        return list(self.seeds if self.exploratory_seeds is None else self.exploratory_seeds)

    def plain_defenses(self) -> list[str]:
        """The inference-time arms on plain's models: `defenses.plain` and every point of `sweeps`, as
        canonical specs, each once (two spellings of one setting are one unit)."""
        specs = list(self.defenses.plain)
        for method, options in self.sweeps.items():
            if method.partition(":")[0].lower() == "regap":
                raise RegapError("sweeps.regap: ReGap is trained, not applied at inference: its λ values are "
                                 "`lambdas` (one trained arm each)")
            if not isinstance(options, dict) or not options:
                raise RegapError(f"sweeps.{method}: expected {{option: [values]}}, got {options!r}")
            for option, values in options.items():
                if not isinstance(values, list) or not values:
                    raise RegapError(f"sweeps.{method}.{option}: expected a list of values, got {values!r}")
                for value in values:
                    specs.append(f"{method}:{option}={value}")
        return _unique_specs(specs, "sweeps" if self.sweeps else "defenses.plain")

    def regap_defenses(self) -> list[str]:
        """The inference-time arms stacked on the main ReGap arm's models (`defenses.regap`), canonical."""
        return _unique_specs(list(self.defenses.regap), "defenses.regap")

    def ablation_lambda(self) -> float:
        """λ of the ablation arms: `ablations.lam`, else the main arm's."""
        return self.regap_lambda if self.ablations.lam is None else self.ablations.lam

    def ablation_variants(self) -> list[tuple[tuple[str, Any], ...]]:
        """The variants the study trains (`normalise_variant`): none without `ablations.seeds`."""
        return self._checked_variants() if self.ablations.seeds else []

    def _checked_variants(self) -> list[tuple[tuple[str, Any], ...]]:
        """`ablations.variants` checked and normalised; a variant equal to the main arm, or to another
        variant, is a one-line error naming it."""
        out: list[tuple[tuple[str, Any], ...]] = []
        for i, raw in enumerate(self.ablations.variants):
            where = f"ablations.variants[{i}]"
            variant = normalise_variant(raw, where)
            if not variant:
                raise RegapError(f"{where}: {_show(raw)} is the main ReGap arm (layer 0, stage 1, centroid), "
                                 "not an ablation")
            if variant in out:
                raise RegapError(f"{where}: {_show(raw)} repeats ablations.variants[{out.index(variant)}] "
                                 f"(both are {ablation_arm(self.ablation_lambda(), variant)})")
            out.append(variant)
        return out

    def _check_ablations(self) -> None:
        self._check_seed_subset("ablations.seeds", self.ablations.seeds, "")
        lam = self.ablations.lam
        if lam is not None and not (lam > 0 and math.isfinite(lam)):
            raise RegapError(f"ablations.lam: must be > 0 (or null for regap_lambda), got {lam}")
        self._checked_variants()  # checked even while no seed trains them

    def _check_seed_subset(self, key: str, seeds: list[int], least: str, alternative: str = "") -> None:
        """`seeds` distinct and among the study's (`least`: "one or more " where an empty list is an error)."""
        if (least and not seeds) or len(set(seeds)) != len(seeds) or any(s not in self.seeds for s in seeds):
            raise RegapError(f"{key}: need {least}distinct seeds among the study's seeds {self.seeds}{alternative}, "
                             f"got {seeds}")

    def check(self) -> "StudyConfig":
        """Values that would fail minutes into a run fail here, naming the key."""
        check_attention(self.attn_implementation)
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise RegapError(f"seeds: need one or more distinct seeds, got {self.seeds}")
        if self.exploratory_seeds is not None:
            self._check_seed_subset("exploratory_seeds", self.exploratory_seeds, "one or more ",
                                    " (or null for all of them)")
        if 0.0 not in self.lambdas:
            raise RegapError(f"lambdas: must contain 0 (the plain arm), got {self.lambdas}")
        if any(lam < 0 for lam in self.lambdas) or len(set(self.lambdas)) != len(self.lambdas):
            raise RegapError(f"lambdas: need distinct values >= 0, got {self.lambdas}")
        if self.regap_lambda not in self.lambdas or self.regap_lambda == 0:
            raise RegapError(f"regap_lambda: {self.regap_lambda} must be one of the lambdas > 0 {self.lambdas}")
        for key in ("stage1", "stage2"):
            stage: StageSpec = getattr(self, key)
            for name in ("steps", "global_batch", "per_device_batch", "save_every"):
                if getattr(stage, name) < 1:
                    raise RegapError(f"{key}.{name}: must be at least 1, got {getattr(stage, name)}")
            if stage.scenes is not None and not 1 <= stage.scenes <= self.data.synth_n:
                raise RegapError(f"{key}.scenes: must be between 1 and data.synth_n ({self.data.synth_n}), "
                                 f"got {stage.scenes}")
            for name in ("lr", "projector_lr"):
                if getattr(stage, name) is not None and not getattr(stage, name) > 0:
                    raise RegapError(f"{key}.{name}: must be > 0 (or null for the stage config's), "
                                     f"got {getattr(stage, name)}")
        from regap.data.synth import CONVERSATIONS

        if self.data.conversations not in CONVERSATIONS:
            raise RegapError(f"data.conversations: {self.data.conversations!r} is not one of {', '.join(CONVERSATIONS)}")
        if self.safety.primary_judge not in self.safety.judges:
            raise RegapError(f"safety.primary_judge: {self.safety.primary_judge!r} is not one of safety.judges "
                             f"{self.safety.judges}")
        if "text" not in self.safety.conditions:
            raise RegapError("safety.conditions: must contain 'text' (the comparisons are made against it)")
        if not self.safety.xstest_conditions or any(c not in self.safety.conditions or c == "backbone"
                                                    for c in self.safety.xstest_conditions):
            raise RegapError(f"safety.xstest_conditions: {self.safety.xstest_conditions} must be conditions of "
                             f"safety.conditions {self.safety.conditions} (not backbone)")
        self._check_ablations()
        self.plain_defenses()  # every sweep point and defense spec checked (names, options, ranges)
        self.regap_defenses()
        unknown = [e for e in self.evaluations if e not in EVALUATIONS]
        if unknown:
            raise RegapError(f"evaluations: {', '.join(unknown)} not one of {', '.join(EVALUATIONS)}")
        if self.primary.arm is not None:
            if self.primary.arm not in study_arms(self):
                raise RegapError(f"primary.arm: {self.primary.arm!r} is not an arm of this study "
                                 f"({', '.join(study_arms(self))})")
            if not self.primary.image_conditions or any(c not in self.safety.conditions or c in ("text", "backbone")
                                                        for c in self.primary.image_conditions):
                raise RegapError(f"primary.image_conditions: {self.primary.image_conditions} must be image "
                                 f"conditions of safety.conditions {self.safety.conditions}")
            if not 0 < self.primary.qa_margin < 1:
                raise RegapError(f"primary.qa_margin: must be in (0, 1), got {self.primary.qa_margin}")
        if self.preregistration is not None and (Path(self.preregistration).is_absolute()
                                                 or ".." in Path(self.preregistration).parts):
            raise RegapError(f"preregistration: {self.preregistration!r} must be a path inside the results folder")
        if not 0.5 < self.stats.level < 1:
            raise RegapError(f"stats.level: must be in (0.5, 1), got {self.stats.level}")
        from regap.precision import normalise_dtype_name

        normalise_dtype_name(self.dtype)
        return self


def arm_name(lam: float, moca: bool = False) -> str:
    """The name of a trained arm: `plain` (λ = 0), `regap-l<λ>` or `moca`."""
    if moca:
        return "moca"
    return "plain" if lam == 0 else f"regap-l{lam:g}"


def normalise_variant(raw: dict[str, Any], where: str) -> tuple[tuple[str, Any], ...]:
    """An ablation variant as `((key, value), ...)` in `VARIANT_KEYS` order, the keys at the main arm's
    value left out (so `{layer: 0, distance: frechet}` is `{distance: frechet}`); a bad key or value is a
    one-line error naming it."""
    from regap.train.config import DISTANCES

    if not isinstance(raw, dict):
        raise RegapError(f"{where}: expected a mapping such as {{layer: 6}}, got {raw!r}")
    for key, value in raw.items():
        if key not in VARIANT_KEYS:
            raise RegapError(f"{where}.{key}: not a variant key; allowed: {', '.join(VARIANT_KEYS)}")
        if key == "layer" and not (type(value) is int and value >= 0):
            raise RegapError(f"{where}.layer: must be an integer >= 0 (0: the LLM's input embeddings, k: the "
                             f"output of block k), got {value!r}")
        if key == "stage" and not (type(value) is int and value in (1, 2)):
            raise RegapError(f"{where}.stage: must be 1 or 2, got {value!r}")
        if key == "distance" and value not in DISTANCES:
            raise RegapError(f"{where}.distance: {value!r} is not one of {', '.join(DISTANCES)}")
    return tuple((key, raw[key]) for key in VARIANT_KEYS if key in raw and raw[key] != VARIANT_KEYS[key])


def variant_label(variant: tuple[tuple[str, Any], ...]) -> str:
    """The variant's part of an arm name: `layer6`, `stage2`, `frechet`, joined with `,` (`layer6,frechet`)."""
    return ",".join(str(value) if key == "distance" else f"{key}{value}" for key, value in variant)


def parse_variant_label(label: str) -> tuple[tuple[str, Any], ...]:
    """`variant_label`'s inverse: `layer6,frechet` -> (("layer", 6), ("distance", "frechet"))."""
    found: dict[str, Any] = {}
    for part in label.split(","):
        for key in ("layer", "stage"):
            if part.startswith(key) and part[len(key):].isdigit():
                found[key] = int(part[len(key):])
                break
        else:
            found["distance"] = part
    return tuple((key, found[key]) for key in VARIANT_KEYS if key in found)


def ablation_arm(lam: float, variant: tuple[tuple[str, Any], ...]) -> str:
    """The name of an ablation arm: the main ReGap arm's at `lam` and the variant, `regap-l0.1@layer6`."""
    return f"{arm_name(lam)}@{variant_label(variant)}"


def _show(raw: Any) -> str:
    """A variant as written in the config: `{layer: 6, stage: 2}`."""
    if not isinstance(raw, dict):
        return repr(raw)
    return "{" + ", ".join(f"{k}: {v}" for k, v in raw.items()) + "}"


def study_arms(config: StudyConfig) -> list[str]:
    """The trained arms' names in report order (the ablation arms are not among them: they are exploratory,
    never a primary arm)."""
    arms = [arm_name(lam) for lam in sorted(config.lambdas)]
    return arms + (["moca"] if config.moca else [])


def canonical_spec(spec: str, where: str) -> str:
    """`name:key=value...` with the registered name, options sorted and checked (type and documented
    range; a strength option outside its range, or on a method without one, is a one-line error)."""
    from regap.defenses import check_option, get_defense, parse_spec

    name, options = parse_spec(spec)
    get_defense(name)  # an unknown name fails here, naming the registered ones
    parts = []
    for key in sorted(options):
        try:
            value = check_option(name, key, options[key])
        except RegapError as exc:
            raise RegapError(f"{where}: {exc}") from None
        parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    from regap.defenses import DEFENSES

    return ":".join([DEFENSES.key(name), *parts])


def _unique_specs(specs: list[str], where: str) -> list[str]:
    out: list[str] = []
    for spec in specs:
        canonical = canonical_spec(spec, where)
        if canonical not in out:
            out.append(canonical)
    return out


def shipped_study_configs() -> dict[str, Path]:
    folder = Path(str(resources.files("regap") / "configs" / "study"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_study_config(name_or_path: str | Path = "tiny-study", overrides: list[str] | None = None) -> StudyConfig:
    """A shipped name or a YAML path, with `key=value` overrides (dotted for sections); read and
    typed by `regap.config`, the rules the training config follows too."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = shipped_study_configs()
        key = str(name_or_path).removesuffix(".yaml")
        if key not in shipped:
            raise RegapError(f"study config not found: {name_or_path} (not a file; shipped: {', '.join(shipped)})")
        path = shipped[key]
    return typed.load(StudyConfig, path, overrides, label="study config", what="study config").check()
