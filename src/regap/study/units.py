"""What the study runs: its units (one trained model per seed and arm) and the evaluations of each.

An *arm* is a training recipe: `plain` (λ = 0), `regap-l<λ>` (ReGap at λ in stage 1) or `moca`
(λ = 0 with MoCa trained in both stages). A *unit* is one arm at one seed: stage 1, stage 2, then
every evaluation of the final model (and of its stage-1 checkpoint). An inference-time defense on
a trained arm (`plain+cmrm`, `regap-l0.1+cmrm`, ...) is an evaluation unit of its own: it trains
nothing (it uses its arm's models, training them first if needed), so every unit stays within
the time one sitting allows. Units are ordered so that a partial study is as useful as it can be:
the plain and main ReGap arms of every seed first, then the defense arms, then the other λ values,
then MoCa."""

from __future__ import annotations

from dataclasses import dataclass

from regap.study.config import StudyConfig, arm_name


@dataclass(frozen=True)
class UnitSpec:
    arm: str
    seed: int
    lam: float
    moca: bool = False
    defense: str | None = None  # an evaluation unit: this defense on the models of `trained_arm`

    @property
    def trained_arm(self) -> str:
        return arm_name(self.lam, self.moca)

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

    units = [unit(lam, seed) for seed in config.seeds for lam in main]
    units += [defended(lam, seed, d) for seed in config.seeds
              for lam, specs in ((0.0, config.plain_defenses()), (config.regap_lambda, config.regap_defenses()))
              for d in specs]
    units += [unit(lam, seed) for lam in others for seed in config.seeds]
    if config.moca:
        units += [unit(0.0, seed, moca=True) for seed in config.seeds]
    return units


def arm_lambda(arm: str) -> float | None:
    """λ of a trained ReGap arm (`regap-l0.1` -> 0.1); None for plain, MoCa or a defended arm."""
    if not arm.startswith("regap-l") or "+" in arm:
        return None
    return float(arm[len("regap-l"):])


def arm_sort_key(arm: str) -> tuple[bool, int, float, str]:
    """Report order: plain, ReGap by λ, MoCa, then the inference-time arms in the same order."""
    trained, _, defense = arm.partition("+")
    lam = arm_lambda(trained)
    if lam is not None:
        return (bool(defense), 1, lam, defense)
    return (bool(defense), 0 if trained == "plain" else 2, 0.0, defense)


def gap_closing(arm: str) -> str:
    """How an arm closes the modality gap, in words, for the side-by-side table."""
    trained, _, defense = arm.partition("+")
    parts = [] if trained == "plain" else ["training: MoCa"] if trained == "moca" else \
        [f"training: ReGap λ={arm_lambda(trained):g}"]
    if defense:
        parts.append(f"inference: {defense}")
    return ", ".join(parts) or "none (plain LLaVA training)"


def defended_arm(arm: str, defense: str) -> str:
    """The name of an inference-time arm: the defense spec on a trained arm (`plain+cmrm`)."""
    return f"{arm}+{defense}"
