"""Image conditions: which image, if any, goes with a safety request.

A safety evaluation asks the same harmful request under several *conditions*: text
only, the language backbone on its own, a blank or noise image, an unrelated natural
photo, the request rendered as typography (FigStep, MM-SafetyBench), or the image a
benchmark ships. Each condition is an `ImageCondition`; `get_condition(name, **options)`
builds one from the registry (`CONDITIONS`), and `condition.inputs(request)` gives the
text, image and details one request gets under it.

Every image is a deterministic function of the request id and the condition's
settings: random choices are seeded from a SHA-256 hash of the id (never Python's
randomised `hash()`), so a rerun, another process or another machine sees the same
pixels. `describe()` returns the settings to store in provenance and
`details(request_id, prompt, extra)` the per-request facts (which photo, which font,
whether text overflowed the canvas).

The modules: `base` (the interface, the registry, shared helpers), `synthetic` (text,
backbone, blank, noise), `photo` (natural), `typography` (typo/FigStep, mmsb-typo) and
`benchmark`. Importing this package registers all of them.
"""

from regap.safety.conditions.base import (
    CONDITIONS,
    DEFAULT_SIZE,
    ConditionInputs,
    ImageCondition,
    available_conditions,
    get_condition,
    register_condition,
    stable_seed,
)
from regap.safety.conditions.synthetic import Backbone, Blank, GaussianNoise, TextOnly, UniformNoise
from regap.safety.conditions.photo import DEFAULT_NATURAL_PHOTOS, IMAGE_SUFFIXES, Natural
from regap.safety.conditions.typography import (
    FIGSTEP_PROMPT,
    FREEMONO_BOLD,
    FREEMONO_BOLD_ELSEWHERE,
    FigStepTypo,
    MMSBTypo,
    figstep_font,
    figstep_text,
    is_figstep_font,
    matplotlib_font,
    wrap_to_width,
)
from regap.safety.conditions.benchmark import BenchmarkImage

__all__ = [
    "FIGSTEP_PROMPT",
    "FREEMONO_BOLD",
    "FREEMONO_BOLD_ELSEWHERE",
    "DEFAULT_NATURAL_PHOTOS",
    "DEFAULT_SIZE",
    "IMAGE_SUFFIXES",
    "CONDITIONS",
    "ConditionInputs",
    "ImageCondition",
    "register_condition",
    "get_condition",
    "available_conditions",
    "stable_seed",
    "figstep_font",
    "is_figstep_font",
    "figstep_text",
    "matplotlib_font",
    "wrap_to_width",
    "TextOnly",
    "Backbone",
    "Blank",
    "GaussianNoise",
    "UniformNoise",
    "Natural",
    "FigStepTypo",
    "MMSBTypo",
    "BenchmarkImage",
]
