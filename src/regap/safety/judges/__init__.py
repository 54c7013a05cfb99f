"""Response judges: did the model refuse, is the response harmful?

`get_judge(name, **options)` builds a registered judge; `available_judges()` lists
them. Importing this package registers the built-in judges (keyword, relevance,
llamaguard, beaverdam, harmbench, openai); judges that prompt a causal LM build on
`GenerativeJudge`.
"""

from regap.safety.judges.base import (
    JUDGES,
    LABELS,
    Judge,
    JudgeInput,
    Verdict,
    available_judges,
    get_judge,
    judge_class,
    register_judge,
)
from regap.safety.judges.generative import GenerativeJudge
from regap.safety.judges.keyword import GCG_REFUSAL_PHRASES, STRICT_DROPPED, KeywordJudge
from regap.safety.judges.llamaguard import LlamaGuardJudge  # noqa: F401  (registers "llamaguard")
from regap.safety.judges.beaverdam import BeaverDamJudge  # noqa: F401  (registers "beaverdam")
from regap.safety.judges.harmbench import HarmBenchJudge  # noqa: F401  (registers "harmbench")
from regap.safety.judges.openai_compat import OpenAICompatJudge  # noqa: F401  (registers "openai")
from regap.safety.judges.relevance import RelevanceJudge  # noqa: F401  (registers "relevance")
from regap.safety.judges.lexicon import RefusalLexiconJudge  # noqa: F401  (registers "refusal-lexicon")
from regap.safety.judges.agreement import kappa_matrix, pairwise_agreement  # noqa: F401

__all__ = [
    "JUDGES",
    "LABELS",
    "Judge",
    "GenerativeJudge",
    "JudgeInput",
    "Verdict",
    "available_judges",
    "get_judge",
    "judge_class",
    "register_judge",
    "KeywordJudge",
    "GCG_REFUSAL_PHRASES",
    "STRICT_DROPPED",
]
