"""Inference-time defenses as wrappers around a generate function, so they stack.

A defense takes the next `GenerateFn` (the model's own batched generation, or another
defense) and returns a new one. Prompt defenses rewrite the text and call the next;
ECSO calls it several times; CoCA changes decoding. `build_generate(model, names)`
stacks them left to right (the first name is the outermost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image

from regap.errors import RegapError
from regap.provenance import text_hash

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


class Defense:
    """Base class: `wrap(next_fn, model) -> GenerateFn`; `prompts()` are hashed for provenance."""

    name = "defense"

    def prompts(self) -> dict[str, str]:
        return {}

    def settings(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings(),
                "prompt_hashes": {key: text_hash(value) for key, value in self.prompts().items()}}

    def wrap(self, next_fn: GenerateFn, model: LVLM) -> GenerateFn:
        raise NotImplementedError


_DEFENSES: dict[str, type[Defense]] = {}


def register_defense(name: str):
    def decorate(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        _DEFENSES[name] = cls
        return cls

    return decorate


def available_defenses() -> list[str]:
    return sorted(_DEFENSES)


def get_defense(name: str, **options: Any) -> Defense:
    if name not in _DEFENSES:
        raise RegapError(f"unknown defense {name!r}; valid: {', '.join(available_defenses())}")
    return _DEFENSES[name](**options)


def plain_generate(model: LVLM) -> GenerateFn:
    """The model's own batched generation as the innermost `GenerateFn`."""

    def generate(prompts: list[str], images: list[Image.Image | None], settings: Any) -> DefendedResult:
        result = model.generate_detailed(prompts, images, settings)
        return DefendedResult(result.texts, result.new_tokens, [{} for _ in prompts], 1)

    return generate


def build_generate(model: LVLM, defenses: Sequence[Defense]) -> GenerateFn:
    generate = plain_generate(model)
    for defense in reversed(list(defenses)):
        generate = defense.wrap(generate, model)
    return generate
