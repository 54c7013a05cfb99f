"""Utility evaluation: does a safety-tuned model still see and still answer benign requests?

    >>> from pathlib import Path
    >>> from regap.utility import UtilityRun, run_utility
    >>> summary = run_utility(UtilityRun(model="tiny", out=Path("runs/utility"), n=100))
    >>> summary["tasks"]["synthetic-qa"]["score"]

`run_utility` runs the built-in offline suite (`synthetic-qa`, `synthetic-caption`,
`over-refusal`; the tasks and their scoring in `regap.utility.suite`, the run in
`regap.utility.run`); `regap.utility.scoring` holds the pure scoring rules; and
`regap.utility.lmms_eval_plugin` lets lmms-eval run standard benchmarks on a regap model
(`lmms-eval --model regap --model_args path=RUN_DIR`). See docs/utility.md.
"""

from regap.utility.scoring import (
    SCORING_VERSION,
    CaptionScore,
    ShortAnswerScore,
    bootstrap_mean_ci,
    caption_scores,
    find_mentions,
    first_sentence,
    normalize_text,
    object_mentions,
    scene_objects,
    score_short_answer,
)
from regap.utility.run import UtilityRun, run_utility
from regap.utility.suite import TASKS, parse_tasks

__all__ = [
    "SCORING_VERSION",
    "TASKS",
    "UtilityRun",
    "CaptionScore",
    "ShortAnswerScore",
    "bootstrap_mean_ci",
    "caption_scores",
    "find_mentions",
    "first_sentence",
    "normalize_text",
    "object_mentions",
    "parse_tasks",
    "run_utility",
    "scene_objects",
    "score_short_answer",
]
