"""What the study runs: its units (one trained model per seed and arm) and the evaluations of each.

An *arm* is a training recipe: `plain` (λ = 0), `regap-l<λ>` (ReGap at λ in stage 1) or `moca`
(λ = 0 with MoCa trained in both stages). A *unit* is one arm at one seed: stage 1, stage 2, then
every evaluation of the final model (and of its stage-1 checkpoint), plus the inference-time
defense arms that sit on that model (`plain+cmrm`, `regap-l0.1+cmrm`, ...). Units are ordered
so that a partial study is as useful as it can be: the plain and main ReGap arms of every seed
first, then the other λ values, then MoCa."""

from __future__ import annotations

from dataclasses import dataclass, field

from regap.study.config import StudyConfig


@dataclass(frozen=True)
class UnitSpec:
    arm: str
    seed: int
    lam: float
    moca: bool = False
    defenses: tuple[str, ...] = field(default=())  # inference-time defenses evaluated on this unit's model

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


def arm_name(lam: float, moca: bool = False) -> str:
    if moca:
        return "moca"
    return "plain" if lam == 0 else f"regap-l{lam:g}"


def study_arms(config: StudyConfig) -> list[str]:
    """Arm names in report order."""
    arms = [arm_name(lam) for lam in sorted(config.lambdas)]
    return arms + (["moca"] if config.moca else [])


def plan_units(config: StudyConfig) -> list[UnitSpec]:
    """Every unit of the study, in the order they run."""
    main = [0.0, config.regap_lambda]
    others = [lam for lam in sorted(config.lambdas) if lam not in main]

    def unit(lam: float, seed: int, moca: bool = False) -> UnitSpec:
        if moca:
            defenses: tuple[str, ...] = ()
        elif lam == 0:
            defenses = tuple(config.defenses.plain)
        elif lam == config.regap_lambda:
            defenses = tuple(config.defenses.regap)
        else:
            defenses = ()
        return UnitSpec(arm_name(lam, moca), seed, lam, moca, defenses)

    units = [unit(lam, seed) for seed in config.seeds for lam in main]
    units += [unit(lam, seed) for lam in others for seed in config.seeds]
    if config.moca:
        units += [unit(0.0, seed, moca=True) for seed in config.seeds]
    return units


def defended_arm(arm: str, defense: str) -> str:
    """The name of an inference-time arm: the defense spec on a trained arm (`plain+cmrm`)."""
    return f"{arm}+{defense}"
