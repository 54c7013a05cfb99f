"""The vision side: a transformers vision encoder plus the feature selection LLaVA uses.

Which hidden layer, whether the CLS token is dropped, and optional average-pooling of
the patch grid (to fewer image tokens, which keeps CPU training affordable) are part of
the model's configuration, so a saved model rebuilds with exactly the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from regap.errors import RegapError


@dataclass
class VisionConfig:
    """Where the encoder comes from and how its features become image tokens."""

    source: str
    feature_layer: int | str = -2  # index into hidden_states, or "final" for last_hidden_state
    drop_cls: bool = True
    pool_grid: int | None = None  # pool the patch grid to pool_grid x pool_grid tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SUPPORTED = ("clip_vision_model", "clip", "siglip_vision_model", "siglip", "dinov2",
              "blip_2_vision_model", "instructblip_vision_model")  # the last two: via regap.models.blip2_hf


class VisionTower(nn.Module):
    """Wraps CLIPVisionModel / SiglipVisionModel / Dinov2Model with LLaVA-style feature selection."""

    def __init__(self, encoder: nn.Module, image_processor: Any, config: VisionConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_processor = image_processor
        self.config = config
        model_type = getattr(encoder.config, "model_type", "")
        if model_type not in _SUPPORTED:
            raise RegapError(f"unsupported vision encoder type {model_type!r}; supported: CLIP, SigLIP, DINOv2")
        # SigLIP has no CLS token; CLIP and DINOv2 put it first.
        self.has_cls = model_type not in ("siglip_vision_model", "siglip")

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def num_patches(self) -> int:
        cfg = self.encoder.config
        size = _processor_size(self.image_processor) or cfg.image_size
        return (size // cfg.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Image tokens per image after CLS dropping and pooling."""
        if self.config.pool_grid:
            return self.config.pool_grid**2 + (0 if self.config.drop_cls or not self.has_cls else 1)
        return self.num_patches + (1 if self.has_cls and not self.config.drop_cls else 0)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images, num_tokens, hidden]."""
        dtype = next(self.encoder.parameters()).dtype
        layer = self.config.feature_layer
        if layer == "final":
            features = self.encoder(pixel_values=pixel_values.to(dtype)).last_hidden_state
        else:
            outputs = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
            features = outputs.hidden_states[int(layer)]
        cls = None
        if self.has_cls:
            cls, features = features[:, :1], features[:, 1:]
        if self.config.pool_grid:
            features = _pool_grid(features, self.config.pool_grid)
        if cls is not None and not self.config.drop_cls:
            features = torch.cat([cls, features], dim=1)
        return features


def _pool_grid(patches: torch.Tensor, grid: int) -> torch.Tensor:
    count, side = patches.shape[1], int(math.isqrt(patches.shape[1]))
    if side * side != count:
        raise RegapError(f"cannot pool {count} patch tokens: not a square grid")
    maps = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)
    pooled = F.adaptive_avg_pool2d(maps, grid)
    return pooled.flatten(2).transpose(1, 2)


def _processor_size(processor: Any) -> int | None:
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    if hasattr(size, "height") and size.height:
        return int(size.height)
    if hasattr(size, "shortest_edge") and size.shortest_edge:
        return int(size.shortest_edge)
    return None


def image_backend() -> str | None:
    """transformers' default image backend needs torchvision; fall back to PIL quietly without it."""
    import importlib.util

    return None if importlib.util.find_spec("torchvision") else "pil"


def load_vision_tower(folder_or_id: str, config: VisionConfig, dtype: torch.dtype) -> VisionTower:
    """Load an encoder + its image processor by hub id or local folder."""
    from transformers import AutoConfig, AutoImageProcessor

    from regap.models.loading.sources import hub_call

    model_config = hub_call(folder_or_id, AutoConfig.from_pretrained, folder_or_id)
    kind = model_config.model_type
    if kind in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel as cls
    elif kind in ("siglip", "siglip_vision_model"):
        from transformers import SiglipVisionModel as cls
    elif kind == "dinov2":
        from transformers import Dinov2Model as cls
    else:
        raise RegapError(f"{folder_or_id}: unsupported vision encoder type {kind!r}; supported: CLIP, SigLIP, DINOv2")
    encoder = hub_call(folder_or_id, cls.from_pretrained, folder_or_id, dtype=dtype)
    processor = hub_call(folder_or_id, AutoImageProcessor.from_pretrained, folder_or_id, backend=image_backend())
    return VisionTower(encoder.eval(), processor, config)
