"""Pure scoring functions for the utility suite: short answers, caption mentions, intervals.

Nothing here touches a model or a file; every rule is documented in docs/utility.md.

Short answers (`score_short_answer`)
    Both texts are normalised (`normalize_text`: Unicode NFKC, lower case, every
    punctuation character replaced by a space, whitespace collapsed, number words
    "zero".."twenty" turned into digits). A response is correct when

    1. its normalised text equals the normalised gold answer ("Yes." == "yes",
       "Two" == "2"), or
    2. the gold answer occurs as a whole word (or whole phrase, "top left") in the
       normalised *first sentence* of the response, and, when the question has
       multiple-choice options, it is the *only* option mentioned there.

    Options are found longest first without overlap, so "the top left" mentions only
    "top left", not also "top" and "left". A final plural "s"/"es" is tolerated on the
    last word ("circles" mentions "circle"). So "Red." and "The circle is red." score,
    while "red, blue, green or yellow" (all the options) and "Yes, no doubt" (both
    options) do not.

Captions (`caption_scores`)
    An object mention is a colour word followed by a shape word, with at most two
    modifiers between them (size, texture or shade words such as "small", "striped").
    "two small striped red circles" mentions (red, circle); "a light blue background"
    mentions nothing. Precision and recall compare the set of mentioned (colour, shape)
    pairs with the scene's pairs; a response that mentions no object scores 0 on both.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

#: Bumped whenever a rule here changes a score (stored in utility.json provenance).
SCORING_VERSION = "1"

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_APOSTROPHES = str.maketrans({c: "'" for c in "\u2019\u2018\u02bc\u2032\uff07"})
_NON_WORD = re.compile(r"[^\w\s]|_", re.UNICODE)
# A sentence ends at . ! ? followed by whitespace or the end, or at a line break.
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")

#: Words allowed between a colour and a shape in a caption mention.
CAPTION_MODIFIERS = frozenset(
    "small large big tiny little huge striped stripy dotted spotted solid filled plain light dark bright pale".split()
)
MAX_MODIFIERS = 2


# --------------------------------------------------------------------------- text


def normalize_text(text: str | None) -> str:
    """Lower-cased words separated by single spaces; punctuation gone; number words as digits."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", str(text)).translate(_APOSTROPHES).lower()
    tokens = _NON_WORD.sub(" ", text).split()
    return " ".join(_NUMBER_WORDS.get(token, token) for token in tokens)


def first_sentence(text: str | None) -> str:
    """The response up to its first sentence end (`.`, `!`, `?` before a space, or a newline)."""
    if not text:
        return ""
    stripped = str(text).strip()
    match = _SENTENCE_END.search(stripped)
    return stripped[: match.start()] if match else stripped


def _token_matches(token: str, word: str, allow_plural: bool) -> bool:
    if token == word:
        return True
    return allow_plural and word.isalpha() and token in (word + "s", word + "es")


def find_mentions(text: str, phrases: Iterable[str]) -> list[str]:
    """The phrases mentioned in `text` as whole words, longest first without overlap.

    `text` and the phrases are normalised here. The last word of a phrase may carry a
    plural "s"/"es". Returns the distinct normalised phrases in order of first mention.
    """
    tokens = normalize_text(text).split()
    candidates: list[tuple[int, int, str]] = []  # (start, end, phrase)
    for phrase in dict.fromkeys(normalize_text(p) for p in phrases):
        words = phrase.split()
        if not words:
            continue
        width = len(words)
        for start in range(len(tokens) - width + 1):
            window = tokens[start : start + width]
            if all(t == w for t, w in zip(window[:-1], words[:-1])) and _token_matches(
                window[-1], words[-1], allow_plural=True
            ):
                candidates.append((start, start + width, phrase))
    taken = [False] * len(tokens)
    kept: list[tuple[int, str]] = []
    for start, end, phrase in sorted(candidates, key=lambda c: (-(c[1] - c[0]), c[0])):
        if any(taken[start:end]):
            continue
        taken[start:end] = [True] * (end - start)
        kept.append((start, phrase))
    return list(dict.fromkeys(phrase for _, phrase in sorted(kept)))


# --------------------------------------------------------------------------- short answers


@dataclass(frozen=True)
class ShortAnswerScore:
    """Whether a short answer is correct, and by which rule.

    `rule`: `exact` (normalised equality), `first_sentence` (gold mentioned, alone among
    the options), `ambiguous` (gold mentioned together with other options), `wrong`
    (gold not mentioned in the first sentence), `empty` (no response text).
    """

    correct: bool
    rule: str
    mentioned: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mentioned"] = list(self.mentioned)
        return data


def score_short_answer(response: str | None, gold: str, choices: Sequence[str] | None = None) -> ShortAnswerScore:
    """Score one short answer; see the module docstring for the rule."""
    gold_norm = normalize_text(gold)
    response_norm = normalize_text(response)
    if not response_norm:
        return ShortAnswerScore(False, "empty")
    if response_norm == gold_norm:
        return ShortAnswerScore(True, "exact", (gold_norm,))
    sentence = first_sentence(response)
    if choices:
        options = [normalize_text(c) for c in choices]
        if gold_norm not in options:
            options.append(gold_norm)
        mentioned = tuple(find_mentions(sentence, options))
        if gold_norm not in mentioned:
            return ShortAnswerScore(False, "wrong", mentioned)
        if len(mentioned) > 1:
            return ShortAnswerScore(False, "ambiguous", mentioned)
        return ShortAnswerScore(True, "first_sentence", mentioned)
    mentioned = tuple(find_mentions(sentence, [gold_norm]))
    if mentioned:
        return ShortAnswerScore(True, "first_sentence", mentioned)
    return ShortAnswerScore(False, "wrong")


# --------------------------------------------------------------------------- captions


def _singular(word: str, shapes: frozenset[str]) -> str | None:
    if word in shapes:
        return word
    for suffix in ("es", "s"):
        if word.endswith(suffix) and word[: -len(suffix)] in shapes:
            return word[: -len(suffix)]
    return None


def object_mentions(
    text: str | None, colors: Iterable[str] | None = None, shapes: Iterable[str] | None = None
) -> set[tuple[str, str]]:
    """(colour, shape) pairs a text mentions: a colour word, at most two modifiers, a shape word."""
    if colors is None or shapes is None:
        from regap.data.synth import COLORS, SHAPES

        colors = COLORS if colors is None else colors
        shapes = SHAPES if shapes is None else shapes
    color_set = frozenset(normalize_text(c) for c in colors)
    shape_set = frozenset(normalize_text(s) for s in shapes)
    tokens = normalize_text(text).split()
    found: set[tuple[str, str]] = set()
    for index, token in enumerate(tokens):
        if token not in color_set:
            continue
        position = index + 1
        skipped = 0
        while position < len(tokens) and tokens[position] in CAPTION_MODIFIERS and skipped < MAX_MODIFIERS:
            position += 1
            skipped += 1
        if position < len(tokens):
            shape = _singular(tokens[position], shape_set)
            if shape is not None:
                found.add((token, shape))
    return found


def scene_objects(spec: Any) -> set[tuple[str, str]]:
    """The (colour, shape) pairs of a scene: a `SceneSpec`, its dict, or a list of groups."""
    if hasattr(spec, "groups"):
        groups = spec.groups
    elif isinstance(spec, dict):
        groups = spec["groups"]
    else:
        groups = spec
    pairs = set()
    for group in groups:
        color = group["color"] if isinstance(group, dict) else group.color
        shape = group["shape"] if isinstance(group, dict) else group.shape
        pairs.add((str(color), str(shape)))
    return pairs


def _gold_pairs(gold: Any) -> set[tuple[str, str]]:
    if hasattr(gold, "groups") or isinstance(gold, dict):
        return scene_objects(gold)
    items = list(gold)
    if items and (isinstance(items[0], dict) or hasattr(items[0], "color")):
        return scene_objects(items)
    return {(str(color), str(shape)) for color, shape in items}


@dataclass(frozen=True)
class CaptionScore:
    precision: float
    recall: float
    f1: float
    mentioned: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    gold: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1,
                "mentioned": [list(p) for p in self.mentioned], "gold": [list(p) for p in self.gold]}


def caption_scores(response: str | None, gold: Iterable[tuple[str, str]] | Any) -> CaptionScore:
    """Precision / recall / F1 of the (colour, shape) pairs a caption mentions against the scene's."""
    gold_pairs = _gold_pairs(gold)
    mentioned = object_mentions(response)
    hits = len(mentioned & gold_pairs)
    precision = hits / len(mentioned) if mentioned else 0.0
    recall = hits / len(gold_pairs) if gold_pairs else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return CaptionScore(precision, recall, f1, tuple(sorted(mentioned)), tuple(sorted(gold_pairs)))


# --------------------------------------------------------------------------- summaries


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (resampling items). n = 0 gives (0, 1);
    n = 1 gives the single value twice (no spread can be estimated)."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        return (0.0, 1.0)
    if array.size == 1:
        return (float(array[0]), float(array[0]))
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, array.size, size=(n_boot, array.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def proportion(k: int, n: int, level: float = 0.95) -> dict[str, Any]:
    """`{"score", "ci", "n", "k"}` for k of n with a Wilson interval (score None when n = 0)."""
    from regap.safety.metrics import wilson_interval

    low, high = wilson_interval(k, n, level)
    return {"score": (k / n) if n else None, "ci": [low, high], "n": int(n), "k": int(k)}


def mean_with_ci(values: Sequence[float], level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """`{"score", "ci", "n"}`: mean and percentile-bootstrap interval (score None when empty)."""
    values = [float(v) for v in values]
    mean = float(np.mean(values)) if values else None
    if mean is not None and math.isnan(mean):
        mean = None
    low, high = bootstrap_mean_ci(values, level=level, seed=seed)
    return {"score": mean, "ci": [low, high], "n": len(values)}
