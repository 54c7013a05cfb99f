"""The LVLM model layer: build from parts, load presets and HF LLaVA / BLIP-2 checkpoints, save, generate."""

from regap.models.attention import llm_attention, set_llm_attention
from regap.models.blip2_hf import load_blip2_hf
from regap.models.loading.build import build_lvlm, parse_dtype, replace_projector
from regap.models.loading.load import load_model, load_trained
from regap.models.generation import DecodingSettings
from regap.models.inputs import IGNORE_INDEX, ModelInputs
from regap.models.loading.saved import load_projector, load_saved, save_model, save_projector
from regap.models.llava_hf import export_llava_hf, load_llava_hf
from regap.models.lvlm import LVLM, LVLMConfig
from regap.models.moca import MoCa, load_moca, save_moca
from regap.models.loading.presets import PRESETS, get_preset
from regap.models.projector import build_projector
from regap.models.qformer import QFormerProjector, build_qformer_projector
from regap.models.vision import VisionConfig, VisionTower

__all__ = [
    "IGNORE_INDEX", "LVLM", "LVLMConfig", "MoCa", "ModelInputs", "DecodingSettings", "PRESETS", "QFormerProjector",
    "VisionConfig", "VisionTower", "build_lvlm", "build_projector", "build_qformer_projector", "export_llava_hf",
    "get_preset", "llm_attention", "load_blip2_hf", "load_llava_hf", "load_model", "load_moca", "load_trained", "load_projector", "load_saved",
    "parse_dtype", "replace_projector", "save_model", "save_moca", "save_projector", "set_llm_attention",
]
