"""Inference-time defenses as wrappers around a generate function, so they stack.

A defense takes the next `GenerateFn` (the model's own batched generation, or another
defense) and returns a new one. Prompt defenses rewrite the text and call the next;
ECSO calls it several times; CoCA changes decoding; CMRM and layer0-align change hidden
states with forward hooks (`regap.defenses.hooks`). `build_generate(model, defenses)`
prepares them (loads or computes calibration files) and stacks them left to right (the
first name is the outermost).

The calibrated defenses fit their files on image-text pairs. Building pairs needs the image
and request sources, which live above this package, so the caller passes the builder in
(`make_pairs`, normally `regap.safety.pairs.make_pairs`): defenses import only the model layer.

A defense is named by a spec, `name` or `name:key=value:key=value`
(`cmrm:alpha=0.5:layers=8-15`, the grammar of `regap.specs`: values read as JSON where they
parse); the keys are the defense's constructor options, checked with their types and the
ranges a class declares in `option_ranges`. `strength_option` names the option that sets how
much a defense acts (`cmrm`: alpha, `layer0-align`: strength, `coca`: alpha), for sweeps;
`check_option` / `check_strength` check one value the way a run would, before any model loads.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from PIL import Image

from regap.errors import RegapError
from regap.files import file_sha256
from regap.option_types import in_range, range_text
from regap.provenance import text_hash
from regap.registry import Registry
from regap.specs import parse_spec as _parse_spec

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM


@dataclass
class DefendedResult:
    texts: list[str]
    new_tokens: list[int]
    details: list[dict[str, Any]]
    generation_calls: int  # batched generate() calls made (ECSO and CoCA cost extra)
    forward_passes_factor: float = 1.0  # decoding cost per token relative to plain generation


GenerateFn = Callable[[list[str], list[Image.Image | None], Any], DefendedResult]
#: A hidden-state intervention for a plain forward pass: called with the batch's conversations, their
#: image lists and whether the batch has the generation prompt, it returns a context manager under
#: which a forward pass over exactly those rows (in that order) runs with the intervention.
Intervention = Callable[[list[Any], list[list[Image.Image]], bool], AbstractContextManager]
#: Builds calibration pairs, `make_pairs(n, images=..., texts=..., seed=...)` -> `GapPair`s
#: (`regap.safety.pairs.make_pairs`).
PairMaker = Callable[..., list[Any]]


class Defense:
    """Base class: `wrap(next_fn, model) -> GenerateFn`; `prompts()` are hashed for provenance."""

    name = "defense"
    #: Whether the defense acts on hidden states (then `intervention` is not None and
    #: `regap gap --defense` can measure under it).
    hidden_state = False
    #: The documented range of each numeric option that has one, {key: (low, high)} (None: open);
    #: the registry refuses a value outside it, naming the range.
    option_ranges: ClassVar[dict[str, tuple[float | None, float | None]]] = {}
    #: The option that sets how strongly the defense acts (swept on the frontier), if it has one.
    strength_option: ClassVar[str | None] = None

    def prompts(self) -> dict[str, str]:
        return {}

    def settings(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings(),
                "prompt_hashes": {key: text_hash(value) for key, value in self.prompts().items()}}

    def check_engine(self, engine: str) -> None:
        """Raise a RegapError when this defense cannot run with that generation engine."""

    def prepare(self, model: LVLM, workdir: Path | None = None, make_pairs: PairMaker | None = None) -> None:
        """Load or compute what the defense needs for this model (calibration files go to
        `workdir`; `make_pairs` builds the pairs a calibration is computed on)."""

    def intervention(self, model: LVLM) -> Intervention | None:
        """The hidden-state intervention `regap gap --defense` measures under; None when the
        defense changes prompts or decoding instead. Call `prepare` first."""
        return None

    def wrap(self, next_fn: GenerateFn, model: LVLM) -> GenerateFn:
        raise NotImplementedError


#: Every defense by name; `register_defense` adds to it, `get_defense` builds from it.
DEFENSES: Registry[type[Defense]] = Registry("defense")


def register_defense(name: str, *aliases: str):
    """Class decorator: register a `Defense` under `name` (its `name` in provenance) and aliases."""

    def decorate(cls: type[Defense]) -> type[Defense]:
        DEFENSES.register(name, *aliases)(cls)
        cls.name = DEFENSES.key(name)
        return cls

    return decorate


def available_defenses() -> list[str]:
    """Registered defense names, sorted."""
    return DEFENSES.names()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`name` or `name:key=value:key=value` -> (name, {key: value}), values read as JSON where they parse."""
    return _parse_spec(spec, "defense spec")


def get_defense(spec: str, **options: Any) -> Defense:
    """The defense named by `spec` (a name or `name:key=value:...`, the name case-insensitive),
    built with its options; an unknown option key, a value of the wrong type or outside its
    documented range is a one-line RegapError."""
    name, parsed = parse_spec(spec)
    return DEFENSES.build(name, **{**parsed, **options})


def check_option(defense: str, key: str, value: Any) -> Any:
    """`value` for `defense`'s option `key` as a run would take it (type and documented range
    checked), e.g. a sweep point before any unit runs; a one-line RegapError otherwise."""
    return DEFENSES.resolve(defense, {key: value})[1][key]


def strength_option(defense: str) -> str | None:
    """The option that sets how strongly `defense` acts (None: it has none)."""
    return DEFENSES.get(defense).strength_option


def check_strength(defense: str, value: Any) -> tuple[str, Any]:
    """(option, value) for a strength `value` of `defense`; a defense without a strength, or a
    value outside its documented range, is a one-line RegapError naming the range."""
    option = strength_option(defense)
    if option is None:
        with_strength = [f"{name} ({DEFENSES.get(name).strength_option})" for name in available_defenses()
                         if DEFENSES.get(name).strength_option]
        raise RegapError(f"defense {DEFENSES.key(defense)!r} has no strength option; defenses with one: "
                         + ", ".join(with_strength))
    return option, check_option(defense, option, value)


def float_option(defense: str, key: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A float option (from a spec string or Python), checked against its documented range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RegapError(f"defense {defense}: {key}={value!r} is not a number") from None
    if not in_range(number, (low, high)):
        raise RegapError(f"defense {defense}: {key}={value} is outside its range {range_text((low, high))}")
    return number


def int_option(defense: str, key: str, value: Any, low: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RegapError(f"defense {defense}: {key}={value!r} is not an integer") from None
    if low is not None and number < low:
        raise RegapError(f"defense {defense}: {key}={value} must be >= {low}")
    return number


def bool_option(defense: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise RegapError(f"defense {defense}: {key}={value!r} is not true/false")


def cached_file_sha256(path: Path) -> str | None:
    """sha256 of a calibration file, recomputed only when its size or modification time changes
    (`describe()` runs for every request of a safety run)."""
    if not path.is_file():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def has_image(image: Any) -> bool:
    """Whether a generate call's image entry holds an image (a PIL image or a non-empty list)."""
    if image is None:
        return False
    return not isinstance(image, (list, tuple)) or len(image) > 0


def plain_generate(model: LVLM) -> GenerateFn:
    """The model's own batched generation as the innermost `GenerateFn`."""

    def generate(prompts: list[str], images: list[Image.Image | None], settings: Any) -> DefendedResult:
        result = model.generate_detailed(prompts, images, settings)
        return DefendedResult(result.texts, result.new_tokens, [{} for _ in prompts], 1)

    return generate


def hidden_state_intervention(defenses: Sequence[Defense], model: LVLM, workdir: Path | None = None,
                              make_pairs: PairMaker | None = None) -> Intervention:
    """Prepare hidden-state defenses for `model` and stack their interventions (the first
    outermost), for measuring the gap with them active."""
    check_hidden_state(defenses)
    for defense in defenses:
        defense.prepare(model, workdir, make_pairs)
    parts = [defense.intervention(model) for defense in defenses]

    @contextmanager
    def enter(conversations: list[Any], image_lists: list[list[Image.Image]], add_generation_prompt: bool):
        with ExitStack() as stack:
            for part in parts:
                stack.enter_context(part(conversations, image_lists, add_generation_prompt))
            yield

    return enter


def check_hidden_state(defenses: Sequence[Defense]) -> None:
    """A RegapError for a defense that changes prompts or decoding rather than hidden states."""
    for defense in defenses:
        if not defense.hidden_state:
            valid = [name for name in available_defenses() if DEFENSES.get(name).hidden_state]
            raise RegapError(f"defense {defense.name} changes prompts or decoding, not hidden states; "
                             f"the gap can be measured under: {', '.join(valid)}")


def is_plain(next_fn: GenerateFn, model: LVLM) -> bool:
    """Whether `next_fn` is the model's own generation (defenses that decode by themselves need that)."""
    return getattr(next_fn, "__qualname__", "") == plain_generate(model).__qualname__


def build_generate(model: LVLM, defenses: Sequence[Defense], workdir: Path | None = None,
                   engine: str | None = None, make_pairs: PairMaker | None = None) -> GenerateFn:
    """Check each defense against `engine`, prepare it for `model` (calibration files in `workdir`,
    else the regap cache, computed on pairs from `make_pairs`) and stack them, the first outermost."""
    for defense in defenses:
        if engine is not None:
            defense.check_engine(engine)
        defense.prepare(model, workdir, make_pairs)
    generate = plain_generate(model)
    for defense in reversed(list(defenses)):
        generate = defense.wrap(generate, model)
    return generate
