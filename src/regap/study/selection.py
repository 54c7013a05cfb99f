"""Which ReGap λ a study would ship: a stated rule, applied to the aggregate. It is exploratory: the rule
was written on 2026-12-01, after the first λ results of `tiny-study` were seen, so it is not a
pre-registered choice (a confirmatory study fixes its λ in `PREREGISTRATION.md` before it runs).

ReGap exists to lower the unsafe rate under images; what it may cost is utility. So the rule is:
among the λ values whose models, over every planned seed, lower the main judge's unsafe rate under the
image conditions (pooled) with an interval that excludes zero, ship the one with the highest held-out QA
accuracy. If no λ qualifies, the study's main arm (`regap_lambda`) stays. While a λ still misses seeds,
the choice is marked undecided: one more seed can move an interval across zero."""

from __future__ import annotations

from typing import Any

from regap.study.config import arm_name
from regap.study.units import arm_lambda

RULE = ("among the ReGap λ values whose pooled-image unsafe rate (main judge) minus plain's has an interval "
        "below zero over every planned seed, the one with the highest held-out QA; none: the main arm "
        "(regap_lambda) stays")


def choose_lambda(result: dict[str, Any], planned_seeds: dict[str, list[int]], main_lambda: float) -> dict[str, Any]:
    """Apply `RULE` to one judge's aggregate (`regap.study.stats.aggregate`); `planned_seeds` maps each arm
    to the seeds the study plans for it (an arm outside the main pair may have fewer: `exploratory_seeds`)."""
    candidates: dict[str, dict[str, Any]] = {}
    for arm, diff in result.get("vs_plain", {}).items():
        lam = arm_lambda(arm)
        if lam is None:
            continue
        unsafe = diff.get("unsafe", {}).get("image (pooled)")
        qa = (result["arms"].get(arm) or {}).get("qa")
        have = sorted(unsafe["seeds"]) if unsafe else []
        candidates[arm] = {
            "lambda": lam, "seeds": have, "complete": have == sorted(planned_seeds.get(arm, [])),
            "unsafe_image_vs_plain": None if unsafe is None else {"mean": unsafe["mean"], "ci": unsafe["ci"]},
            "lowers_unsafe": unsafe is not None and unsafe["ci"] is not None and unsafe["ci"][1] < 0,
            "qa": None if qa is None else qa["mean"],
        }
    qualifying = [arm for arm, c in candidates.items() if c["complete"] and c["lowers_unsafe"] and c["qa"] is not None]
    if qualifying:
        arm = max(qualifying, key=lambda a: (candidates[a]["qa"], -candidates[a]["lambda"]))
        reason = (f"{arm} lowers the pooled-image unsafe rate with an interval below zero"
                  + (f" and has the highest QA of {', '.join(sorted(qualifying))}" if len(qualifying) > 1 else
                     " (the only λ that does)"))
    else:
        arm = arm_name(main_lambda)
        reason = "no λ lowers the pooled-image unsafe rate with an interval below zero over every planned seed; " \
                 "the main arm stays"
    waiting = sorted(a for a, c in candidates.items() if not c["complete"])
    return {"rule": RULE, "arm": arm, "lambda": candidates.get(arm, {}).get("lambda", main_lambda),
            "decided": not waiting, "waiting_for": waiting, "reason": reason, "candidates": candidates}
