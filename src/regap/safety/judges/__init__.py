"""Response judges: did the model refuse, is the response harmful?

`get_judge(name, **options)` builds a registered judge; `available_judges()` lists
them. Importing this package registers the built-in judges (`keyword`).
"""

from regap.safety.judges.base import (
    LABELS,
    Judge,
    JudgeInput,
    Verdict,
    available_judges,
    get_judge,
    register_judge,
)
from regap.safety.judges.keyword import GCG_REFUSAL_PHRASES, STRICT_DROPPED, KeywordJudge

__all__ = [
    "LABELS",
    "Judge",
    "JudgeInput",
    "Verdict",
    "available_judges",
    "get_judge",
    "register_judge",
    "KeywordJudge",
    "GCG_REFUSAL_PHRASES",
    "STRICT_DROPPED",
]
