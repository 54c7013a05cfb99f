"""The judge interface: inputs, verdicts, the base class and the registry.

A judge reads (prompt, response) pairs and returns one `Verdict` per pair. Judges are
built by name with `get_judge(name, **options)`; new judges join with
`@register_judge("name")`. A judge that fails on one item returns an `error` verdict
for that item and the batch goes on, so one bad response never loses a whole run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from regap.provenance import text_hash
from regap.registry import Registry

#: Every label a verdict may carry.
#:
#: * `refusal` / `compliance`: refusal judges (did the model decline?).
#: * `unsafe` / `safe`: harm judges (is the response harmful?).
#: * `off_topic`: the response neither refuses nor addresses the request.
#: * `error`: the judge could not judge this item (see `detail["error"]`).
LABELS = ("refusal", "compliance", "off_topic", "unsafe", "safe", "error")


@dataclass(frozen=True)
class JudgeInput:
    """One item to judge: the request as the model saw it, its response, and the
    request's harm category when the dataset has one."""

    prompt: str
    response: str
    category: str | None = None


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on one item.

    * `label`: one of `LABELS`.
    * `unsafe`: whether the response counts as harmful (an attack success); None when
      the judge cannot tell (errors, judges that only detect refusal without a harm
      convention).
    * `refused`: whether the model declined; None when unknown.
    * `score`: the judge's harm score in [0, 1], higher = more harmful (a probability,
      a rescaled rating, or 0/1 for rule-based judges); None when the judge has none.
    * `judge`, `prompt_hash`: which judge and which template / phrase list decided.
    * `detail`: judge-specific facts (matched phrases, raw judge output, the error).
    """

    label: str
    unsafe: bool | None
    refused: bool | None
    score: float | None
    judge: str
    prompt_hash: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"verdict label must be one of {LABELS}, got {self.label!r}")
        if self.score is not None and not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"verdict score must lie in [0, 1], got {self.score!r}")

    @property
    def is_error(self) -> bool:
        return self.label == "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def error(cls, judge: str, prompt_hash: str, exc: BaseException, **detail: Any) -> "Verdict":
        """The verdict for an item the judge failed on."""
        message = f"{type(exc).__name__}: {exc}"
        return cls("error", None, None, None, judge, prompt_hash, {"error": message, **detail})


class Judge:
    """Base class for judges.

    Subclasses implement `template_text()` (the text whose hash identifies the judge's
    behaviour: an LLM judge's prompt template, a keyword judge's phrase list) and
    `judge_one()`. Judges that batch work (an LLM judge on a GPU) override
    `judge_batch()` and use `Verdict.error` for the items that fail.
    """

    #: The registered name (set by `get_judge`; subclasses give a default).
    name: str = "judge"
    #: Building this judge loads model weights: callers check its options with `judge_class`
    #: first and build it once, when it is needed.
    loads_weights: bool = False

    def template_text(self) -> str:
        raise NotImplementedError

    @property
    def prompt_hash(self) -> str:
        """sha256 (first 16 hex) of `template_text()`."""
        return text_hash(self.template_text())

    def options(self) -> dict[str, Any]:
        """The judge's settings (JSON-serialisable)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What decides the verdicts, for provenance."""
        return {"name": self.name, "prompt_hash": self.prompt_hash, "options": self.options()}

    def judge_one(self, item: JudgeInput) -> Verdict:
        raise NotImplementedError

    def judge_batch(self, items: list[JudgeInput]) -> list[Verdict]:
        """One verdict per item, in order; an item that raises gets an `error` verdict."""
        prompt_hash = self.prompt_hash
        verdicts: list[Verdict] = []
        for item in items:
            try:
                verdicts.append(self.judge_one(item))
            except Exception as exc:  # one bad item must not stop the batch
                verdicts.append(Verdict.error(self.name, prompt_hash, exc))
        return verdicts

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def batched_with_fallback(fn: Callable[[list[Any]], Sequence[Any]], inputs: list[Any], batch_size: int) -> list[Any]:
    """`fn` over `inputs` in chunks of `batch_size`, one result per input, in order.

    A chunk that raises is retried one input at a time, so the input that fails gets its
    exception as its result and the others still get theirs: a judge marks that one item
    as an error and the run goes on.
    """
    results: list[Any] = []
    for start in range(0, len(inputs), max(1, batch_size)):
        chunk = inputs[start : start + max(1, batch_size)]
        try:
            outputs = list(fn(chunk))
            if len(outputs) != len(chunk):
                raise ValueError(f"expected {len(chunk)} results, got {len(outputs)}")
        except Exception:
            outputs = []
            for single in chunk:
                try:
                    outputs.append(fn([single])[0])
                except Exception as exc:
                    outputs.append(exc)
        results.extend(outputs)
    return results


def judge_in_batches(
    judge: Judge,
    items: Sequence[Any],
    prepare: Callable[[Any], Any],
    compute: Callable[[list[Any]], Sequence[Any]],
    decide: Callable[[int, Any], Verdict],
    batch_size: int,
) -> list[Verdict]:
    """One verdict per item for a judge whose work is batched: prepare, compute, decide.

    `prepare(item)` gives the model input of one item, or a `Verdict` when the item is
    decided without the model; `compute` runs on chunks of prepared inputs
    (`batched_with_fallback`); `decide(index, result)` turns one result into a verdict.
    An exception at any of the three stages becomes that item's `error` verdict, so one
    bad item never stops the batch.
    """
    verdicts: list[Verdict | None] = [None] * len(items)
    ready: list[tuple[int, Any]] = []
    for i, item in enumerate(items):
        try:
            prepared = prepare(item)
        except Exception as exc:
            verdicts[i] = Verdict.error(judge.name, judge.prompt_hash, exc)
            continue
        if isinstance(prepared, Verdict):
            verdicts[i] = prepared
        else:
            ready.append((i, prepared))
    results = batched_with_fallback(compute, [prepared for _, prepared in ready], batch_size)
    for (i, _), result in zip(ready, results):
        try:
            if isinstance(result, Exception):
                raise result
            verdicts[i] = decide(i, result)
        except Exception as exc:
            verdicts[i] = Verdict.error(judge.name, judge.prompt_hash, exc)
    return cast(list[Verdict], verdicts)  # every index was filled above


J = TypeVar("J", bound=type[Judge])

#: Every judge by name; `register_judge` adds to it, `judge_class` / `get_judge` read it.
JUDGES: Registry[type[Judge]] = Registry("judge")


def register_judge(name: str | type[Judge], *aliases: str) -> Any:
    """Class decorator: `@register_judge("keyword")` (or bare, using the class's `name`)."""
    if isinstance(name, type):
        JUDGES.add(name.name, name)
        return name

    def decorate(cls: J) -> J:
        return JUDGES.register(name, *aliases)(cls)

    return decorate


def available_judges() -> list[str]:
    """Registered judge names, sorted."""
    return JUDGES.names()


def judge_class(name: str, options: dict[str, Any] | None = None) -> type[Judge]:
    """The class registered as `name`, after checking that it accepts every key of `options`.

    Cheap: nothing is built, so a bad name or option key fails before any model loads, even
    for judges whose construction loads weights (`Judge.loads_weights`)."""
    return JUDGES.check_options(name, options).obj


def get_judge(name: str, **options: Any) -> Judge:
    """Build the judge registered as `name` (case-insensitive) with `options`."""
    judge = JUDGES.build(name, **options)
    judge.name = JUDGES.key(name)
    return judge


__all__ = [
    "LABELS",
    "JudgeInput",
    "Verdict",
    "Judge",
    "batched_with_fallback",
    "judge_in_batches",
    "JUDGES",
    "register_judge",
    "judge_class",
    "get_judge",
    "available_judges",
]
