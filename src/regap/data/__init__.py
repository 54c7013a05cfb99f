"""Training data that does not depend on a model: synthetic scenes, LLaVA JSON, mixing.

See ``docs/data.md`` for the file formats and the validation rules.
"""

from regap.data.llava_json import ConversationSample, DatasetReport, LlavaJsonDataset
from regap.data.mixing import TextOnlySamples, mix, text_only_samples, vlguard_rows, vlguard_to_llava
from regap.data.synth import (
    QA,
    SceneSpec,
    ShapeGroup,
    SynthManifest,
    caption,
    generate_synthetic,
    qa_pairs,
    render_scene,
    sample_scene,
)

__all__ = [
    "QA",
    "ConversationSample",
    "DatasetReport",
    "LlavaJsonDataset",
    "SceneSpec",
    "ShapeGroup",
    "SynthManifest",
    "TextOnlySamples",
    "caption",
    "generate_synthetic",
    "mix",
    "qa_pairs",
    "render_scene",
    "sample_scene",
    "text_only_samples",
    "vlguard_rows",
    "vlguard_to_llava",
]
