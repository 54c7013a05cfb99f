"""What the study runs: its units (one trained model per seed and arm) and the evaluations of each.

An *arm* is a training recipe: `plain` (λ = 0), `regap-l<λ>` (ReGap at λ in stage 1) or `moca`
(λ = 0 with MoCa trained in both stages). A *unit* is one arm at one seed: stage 1, stage 2, then
every evaluation of the final model (and of its stage-1 checkpoint). An inference-time defense on
a trained arm (`plain+cmrm`, `regap-l0.1+cmrm`, ...) is an evaluation unit of its own: it trains
nothing (it uses its arm's models, training them first if needed), so every unit stays within
the time one sitting allows. The main pair (plain and the main ReGap arm) runs on every seed, every other
arm on `exploratory_seeds` (all seeds unless set). Units are ordered so that a partial study is as useful as it can be:
the plain and main ReGap arms of every seed first, then the defense arms, then the other λ values,
then MoCa, then the exploratory ablations (`regap-l<λ>@layer6`, `@stage2`, `@frechet`, ...: the main ReGap
arm with one setting changed; an `@` arm is never a defended arm, even when its variant holds a `+`, as in
`@centroid+norm`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from regap.study.config import VARIANT_KEYS, StudyConfig, ablation_arm, arm_name, parse_variant_label

Variant = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class UnitSpec:
    arm: str
    seed: int
    lam: float
    moca: bool = False
    defense: str | None = None  # an evaluation unit: this defense on the models of `trained_arm`
    variant: Variant | None = None  # an ablation unit: the main ReGap arm with these settings changed

    @property
    def trained_arm(self) -> str:
        return arm_name(self.lam, self.moca) if self.variant is None else ablation_arm(self.lam, self.variant)

    @property
    def regap_stage(self) -> int:
        """The stage that trains with ReGap on (2 for a stage-2 ablation, else 1)."""
        return int(dict(self.variant or ()).get("stage", 1))

    @property
    def stage1_from(self) -> str | None:
        """The unit whose stage 1 this one reuses: a stage-2 ablation trains stage 1 without ReGap, which is
        plain's stage 1 of the same seed."""
        return f"plain-s{self.seed}" if self.regap_stage == 2 else None

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"

    @property
    def trained_name(self) -> str:
        """The unit whose trained models this one evaluates (itself, for a training unit)."""
        return f"{self.trained_arm}-s{self.seed}"


def plan_units(config: StudyConfig) -> list[UnitSpec]:
    """Every unit of the study, in the order they run."""
    main = [0.0, config.regap_lambda]
    others = [lam for lam in sorted(config.lambdas) if lam not in main]

    def unit(lam: float, seed: int, moca: bool = False) -> UnitSpec:
        return UnitSpec(arm_name(lam, moca), seed, lam, moca)

    def defended(lam: float, seed: int, defense: str) -> UnitSpec:
        return UnitSpec(defended_arm(arm_name(lam), defense), seed, lam, False, defense)

    seeds = config.arm_seeds()  # every arm outside the main pair
    units = [unit(lam, seed) for seed in config.seeds for lam in main]
    units += [defended(lam, seed, d) for seed in seeds
              for lam, specs in ((0.0, config.plain_defenses()), (config.regap_lambda, config.regap_defenses()))
              for d in specs]
    units += [unit(lam, seed) for lam in others for seed in seeds]
    if config.moca:
        units += [unit(0.0, seed, moca=True) for seed in seeds]
    lam = config.ablation_lambda()
    units += [UnitSpec(ablation_arm(lam, variant), seed, lam, variant=variant)
              for variant in config.ablation_variants() for seed in config.ablations.seeds]
    return units


def planned_seeds(units: list[UnitSpec]) -> dict[str, list[int]]:
    """Each arm's planned seeds, in plan order."""
    out: dict[str, list[int]] = {}
    for u in units:
        out.setdefault(u.arm, []).append(u.seed)
    return out


def split_arm(arm: str) -> tuple[str, str | None, str]:
    """(trained arm, variant label or None, defense spec or "") of an arm name: `regap-l0.1@layer6` ->
    (regap-l0.1, layer6, ""), `plain+cmrm` -> (plain, None, cmrm). An `@` before any `+` makes an ablation
    arm, which is never defended (`regap-l0.1@centroid+norm` is the centroid+norm distance, not a defense)."""
    head = arm.partition("+")[0]
    if "@" in head:
        trained, _, label = arm.partition("@")
        return trained, label, ""
    return head, None, arm.partition("+")[2]


def is_defended(arm: str) -> bool:
    """Whether an arm is an inference-time defense on a trained arm (`plain+cmrm`)."""
    return bool(split_arm(arm)[2])


def arm_lambda(arm: str) -> float | None:
    """λ of a main-recipe trained ReGap arm (`regap-l0.1` -> 0.1); None for plain, MoCa, a defended arm or
    an ablation (`regap-l0.1@layer6`: see `ablation_of`)."""
    trained, label, defense = split_arm(arm)
    if not trained.startswith("regap-l") or label is not None or defense:
        return None
    return float(trained[len("regap-l"):])


def ablation_of(arm: str) -> tuple[float, dict[str, Any]] | None:
    """(λ, the settings it changes) of an ablation arm: `regap-l0.1@layer6` -> (0.1, {"layer": 6}); None
    for any other arm."""
    trained, label, _ = split_arm(arm)
    if label is None or not trained.startswith("regap-l"):
        return None
    return float(trained[len("regap-l"):]), dict(parse_variant_label(label))


def _variant_order(variant: dict[str, Any]) -> tuple:
    """Ablations in the order of their first changed key (layer, stage, distance), then by value."""
    from regap.train.config import DISTANCES

    rank = {"distance": lambda v: DISTANCES.index(v) if v in DISTANCES else len(DISTANCES)}
    return tuple((key not in variant, rank.get(key, int)(variant.get(key, default)))
                 for key, default in VARIANT_KEYS.items())


def arm_sort_key(arm: str) -> tuple[bool, int, float, tuple, str]:
    """Report order: plain, ReGap by λ, MoCa, the ablations (by λ, then variant), then the inference-time
    arms in the same order."""
    ablation = ablation_of(arm)
    if ablation is not None:
        return (False, 3, ablation[0], _variant_order(ablation[1]), "")
    trained, _, defense = split_arm(arm)
    lam = arm_lambda(trained)
    if lam is not None:
        return (bool(defense), 1, lam, (), defense)
    return (bool(defense), 0 if trained == "plain" else 2, 0.0, (), defense)


def describe_variant(variant: dict[str, Any]) -> str:
    """An ablation's settings in words: `at block 6 in stage 2 with the frechet distance`."""
    parts = []
    if variant.get("layer", 0):
        parts.append(f"at block {variant['layer']}")
    if variant.get("stage", 1) != 1:
        parts.append(f"in stage {variant['stage']}")
    if variant.get("distance", "centroid") != "centroid":
        parts.append(f"with the {variant['distance']} distance")
    return " ".join(parts)


def gap_closing(arm: str) -> str:
    """How an arm closes the modality gap, in words, for the side-by-side table."""
    trained, _, defense = split_arm(arm)
    ablation = ablation_of(arm)
    if ablation is not None:
        return f"training: ReGap λ={ablation[0]:g} {describe_variant(ablation[1])}"
    parts = [] if trained == "plain" else ["training: MoCa"] if trained == "moca" else \
        [f"training: ReGap λ={arm_lambda(trained):g}"]
    if defense:
        parts.append(f"inference: {defense}")
    return ", ".join(parts) or "none (plain LLaVA training)"


def defended_arm(arm: str, defense: str) -> str:
    """The name of an inference-time arm: the defense spec on a trained arm (`plain+cmrm`)."""
    return f"{arm}+{defense}"
