"""A model's fingerprint: what decides its outputs besides the inputs.

Config, dtype, the LLM's attention kernel when it is not `sdpa`, every projector weight, every
MoCa weight (when the model has MoCa), and a sample of every backbone weight (the first and last
`sample` values of each tensor), so caches keyed by it are never reused after a projector or MoCa
is retrained or an LLM fine-tuned, while hashing stays fast for a 7B model. A model without MoCa keeps the
fingerprint it had before MoCa was part of it, and one on `sdpa` (transformers' default) the
fingerprint it had before the kernel was: kernels differ in rounding, so cached generations of
one are not reused for another.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from regap.models.attention import llm_attention

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM
    from regap.models.vision import VisionTower


def model_fingerprint(model: LVLM, sample: int = 1024) -> str:
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(model.dtype).encode())
    kernel = llm_attention(model)
    if kernel not in (None, "sdpa"):
        digest.update(f"attention:{kernel}".encode())
    for name, tensor in sorted(model.projector.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    moca = getattr(model, "moca", None)
    if moca is not None:
        for name, tensor in sorted(moca.state_dict().items()):
            digest.update(f"moca.{name}".encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    for part in ("llm", "vision"):
        module = getattr(model, part, None)
        if module is None or not hasattr(module, "named_parameters"):
            continue
        _digest_parameters(digest, part, module, sample)
    return digest.hexdigest()[:16]


def vision_fingerprint(vision: VisionTower, sample: int = 1024) -> str:
    """What decides a vision tower's features: its config, the image preprocessing, dtype and a
    sample of every weight (keys the frozen-feature cache, `regap.models.feature_cache`)."""
    digest = hashlib.sha256()
    encoder_config = getattr(vision.encoder, "config", None)
    processor = getattr(vision, "image_processor", None)
    described = {
        "tower": vision.config.to_dict(),
        "encoder": encoder_config.to_dict() if encoder_config is not None else None,
        "preprocessing": processor.to_dict() if hasattr(processor, "to_dict") else repr(processor),
        "dtype": str(next(vision.parameters()).dtype),
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    _digest_parameters(digest, "vision", vision, sample)
    return digest.hexdigest()[:16]


def _digest_parameters(digest: Any, part: str, module: Any, sample: int) -> None:
    for name, tensor in module.named_parameters():
        flat = tensor.detach().reshape(-1)
        picked = flat if flat.numel() <= 2 * sample else flat[[*range(sample), *range(-sample, 0)]]
        digest.update(f"{part}.{name}{tuple(tensor.shape)}".encode())
        digest.update(picked.float().cpu().numpy().tobytes())
