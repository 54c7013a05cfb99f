"""How much memory a training run needs per device, before any weight is loaded (`--dry-run`).

Why: a 7B run that does not fit is found out after minutes of loading on a rented machine. The
estimate builds the configured model on the meta device (`accelerate.init_empty_weights`: shapes
and dtypes, no storage), applies the same set-up as training (`setup_model`: freezing, LoRA,
MoCa, float32 trainable weights under mixed precision), and adds up:

* **weights**: `accelerate.utils.compute_module_sizes` of the set-up model (each parameter in
  its own dtype);
* **gradients**: one per trainable parameter, in its dtype;
* **optimizer**: AdamW's two moments per trainable parameter, in its dtype;
* **activations** (what autograd keeps for the backward pass), from the shapes: batch ``b``
  (per device), sequence ``s``, LLM width ``h``, MLP width ``i``, layers ``L``, heads ``a``:

  - per decoder layer and token, ``c_h * h + c_i * i`` bytes (coefficients below, counted with
    `torch.autograd.graph.saved_tensors_hooks` on Llama and Qwen2 layers, non-parameter
    tensors only; `ACTIVATION_BYTES`); with `eager` attention another ``a * s * c_att`` bytes
    for the attention scores;
  - without checkpointing: ``L * b * s * (c_h h + c_i i)``;
  - with checkpointing: the layer inputs, ``L * b * s * h * p`` (p = bytes per element), plus
    one layer recomputed during the backward, ``b * s * (c_h h + c_i i)``;
  - the input embeddings (text and image tokens, ``2 * b * s * h * p``) and the logits at the
    target positions (the loop projects only those, `TrainModule`): ``b * t * V * (p + 8)``
    (the logits, their float32 copy and its gradient), ``t`` = ``s`` less the image tokens;

* **probe** (when `observe.mir_every` is on): the MIR probe fits each layer in float64, about
  `MIR_FIT_MATRICES` d x d matrices at once (two covariances, a Cholesky factor, products,
  the eigen-solver's workspace); the CPU rehearsal's gap step at d = 4,096 peaked 1.45 GiB above
  its starting point, ~11 such matrices, the spilled hidden states included;
* **runtime** (CPU only): the resident memory of this process after importing torch,
  transformers and regap (a training process holds the same libraries);
* **loading** (CPU only): a checkpoint stored in another dtype is read whole (memory-mapped)
  while the converted weights are built, so the loading peak is weights + the stored tensors'
  bytes (read from the safetensors headers of local folders; unknown for hub ids).

The sequence length is the longest of the data's first `LENGTH_SAMPLES` samples as the training
template renders them (image tokens included), up to ``max_length``; without the data file (data
still to be synthesised) it is ``max_length``, the longest a padded batch can be, an upper bound.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from regap.errors import RegapError

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM
    from regap.train.config import TrainConfig

#: Saved-for-backward bytes per decoder layer and token, as (per unit of h, per unit of i), by
#: compute dtype and whether the layer's weights train (LoRA counts as training: its inputs are
#: kept). Counted on Llama and Qwen2 layers (transformers 5, sdpa), identical for both.
ACTIVATION_BYTES = {
    (2, False): (17, 6), (2, True): (25, 8),
    (4, False): (26, 12), (4, True): (42, 16),
}
#: Saved bytes per attention score under `eager` attention (scores and float32 softmax).
EAGER_SCORE_BYTES = {2: 6, 4: 8}
GIB = 2**30
#: d x d float64 matrices alive at once while MIR fits one layer (see the module docstring).
MIR_FIT_MATRICES = 10
#: Samples of the data whose longest rendering sets the sequence length of the estimate.
LENGTH_SAMPLES = 1000


@dataclass
class MemoryEstimate:
    """One device's memory for a training run, in bytes (see the module docstring)."""

    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    probe: int
    activations_checkpointing: int
    activations_no_checkpointing: int
    gradient_checkpointing: bool
    runtime: int
    load_extra: int | None
    batch: int
    sequence: int
    device: str
    sequence_source: str = "given"
    breakdown: dict[str, int] = dataclasses.field(default_factory=dict)

    def total(self, checkpointing: bool | None = None) -> int:
        """Peak while training: weights, gradients, optimizer state, activations, runtime."""
        on = self.gradient_checkpointing if checkpointing is None else checkpointing
        activations = self.activations_checkpointing if on else self.activations_no_checkpointing
        return self.runtime + self.weights + self.gradients + self.optimizer + activations + self.probe

    def loading_peak(self) -> int | None:
        """Peak while the weights load (CPU: the stored checkpoint is read whole); None: unknown."""
        if self.load_extra is None:
            return None
        return self.runtime + self.weights + self.load_extra

    def peak(self, checkpointing: bool | None = None) -> int:
        """The larger of the training and loading peaks (the loading peak counted where known)."""
        return max(self.total(checkpointing), self.loading_peak() or 0)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(total_checkpointing=self.total(True), total_no_checkpointing=self.total(False),
                   loading_peak=self.loading_peak(), peak=self.peak())
        return out

    def lines(self) -> list[str]:
        """The human-readable report `--dry-run` prints."""

        def gib(value: int | None) -> str:
            return "unknown" if value is None else f"{value / GIB:.2f} GiB"

        mark = {True: " (this config)", False: ""}
        out = [f"parameters: {self.parameters:,} ({self.trainable:,} trainable)",
               f"per-device memory at batch {self.batch} x {self.sequence} tokens ({self.sequence_source}), "
               f"on {self.device}:",
               f"  weights        {gib(self.weights)}",
               f"  gradients      {gib(self.gradients)}",
               f"  optimizer      {gib(self.optimizer)} (AdamW, 2 moments per trainable parameter)",
               f"  activations    {gib(self.activations_checkpointing)} with gradient checkpointing"
               f"{mark[self.gradient_checkpointing]}, {gib(self.activations_no_checkpointing)} without"
               f"{mark[not self.gradient_checkpointing]}"]
        if self.probe:
            out.append(f"  MIR probe      {gib(self.probe)} (float64 fits of one layer)")
        if self.device == "cpu":
            out.append(f"  runtime        {gib(self.runtime)} (this process's libraries)")
        out.append(f"  total          {gib(self.total(True))} with checkpointing, {gib(self.total(False))} without")
        if self.device == "cpu":
            out.append(f"  loading peak   {gib(self.loading_peak())}"
                       + (" (the stored checkpoint is read whole while it is converted)" if self.load_extra else ""))
        out.append(f"estimated peak: {gib(self.peak())}")
        return out


# ---------------------------------------------------------------------- the model on the meta device


def meta_model(name: str, dtype: torch.dtype) -> tuple[LVLM, int | None]:
    """The model `name` names (a preset built from parts, a trained preset's base, or
    `tiny-random`) with its weights on the meta device; and the bytes of its stored tensors
    when they are in another dtype than `dtype` (0 when not; None when unknown: hub ids)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    from regap.models.loading.sources import hub_call
    from regap.models.lvlm import LVLM
    from regap.models.loading.sources import resolve_source
    from regap.models.loading.presets import PRESETS, TINY_RANDOM
    from regap.models.vision import VisionTower, image_backend

    if name == TINY_RANDOM:
        from regap.models.random_tiny import tiny_random_lvlm

        return tiny_random_lvlm().to(dtype), 0
    preset = PRESETS.get(name)
    if preset is not None and preset.trained:
        preset = PRESETS.get(preset.base or "")
    if preset is None or preset.config is None:
        raise RegapError(f"--dry-run estimates presets built from parts (e.g. tiny, clip-vicuna-7b) and "
                         f"tiny-random; model {name!r} is not one (load it with the real run instead)")
    config = preset.config
    vision_source, llm_source = resolve_source(config.vision.source), resolve_source(config.llm_source)
    vision_config = hub_call(vision_source, AutoConfig.from_pretrained, vision_source)
    vision_config = getattr(vision_config, "vision_config", None) or vision_config
    llm_config = hub_call(llm_source, AutoConfig.from_pretrained, llm_source)
    processor = hub_call(vision_source, AutoImageProcessor.from_pretrained, vision_source, backend=image_backend())
    tokenizer = hub_call(llm_source, AutoTokenizer.from_pretrained, llm_source)
    encoder_class = _vision_class(vision_config.model_type)
    with init_empty_weights():
        encoder = encoder_class(vision_config).to(dtype)
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype)
        model = LVLM(config, VisionTower(encoder, processor, config.vision), llm, tokenizer)
    model.to(dtype=dtype)
    extra = [stored_bytes_in_other_dtype(source, dtype) for source in (vision_source, llm_source)]
    return model, None if any(e is None for e in extra) else sum(extra)


def _vision_class(kind: str) -> Any:
    if kind in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel

        return CLIPVisionModel
    if kind in ("siglip", "siglip_vision_model"):
        from transformers import SiglipVisionModel

        return SiglipVisionModel
    if kind == "dinov2":
        from transformers import Dinov2Model

        return Dinov2Model
    raise RegapError(f"unsupported vision encoder type {kind!r}; supported: CLIP, SigLIP, DINOv2")


def stored_bytes_in_other_dtype(folder: str, dtype: torch.dtype) -> int | None:
    """Bytes of the tensors in `folder`'s safetensors files that are stored in another dtype than
    `dtype` (read from the headers only); None when `folder` is not a local folder."""
    from safetensors import safe_open

    path = Path(folder)
    if not path.is_dir():
        return None
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                stored = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if stored is not None and stored != dtype:
                    count = 1
                    for size in piece.get_shape():
                        count *= size
                    total += count * stored.itemsize
    return total


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


# ---------------------------------------------------------------------- the estimate


def _llm_shape(llm: Any) -> dict[str, int]:
    config = getattr(llm, "config", None)
    text = getattr(config, "text_config", None) or config
    hidden = int(text.hidden_size)
    return {"hidden": hidden, "intermediate": int(getattr(text, "intermediate_size", 4 * hidden)),
            "layers": int(text.num_hidden_layers), "heads": int(text.num_attention_heads),
            "vocab": int(text.vocab_size)}


def _runtime_bytes() -> int:
    """This process's resident memory now (Linux VmRSS); 0 where unknown."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def estimate_memory(module: torch.nn.Module, config: TrainConfig, *, batch: int, sequence: int,
                    image_tokens: int, device: str = "cpu", load_extra: int | None = 0,
                    runtime: int | None = None) -> MemoryEstimate:
    """The estimate for a model set up for training (`setup_model`'s module, on any device,
    the meta device included) at `batch` samples of `sequence` tokens, `image_tokens` of them
    image tokens (see the module docstring for the terms)."""
    from accelerate.utils import compute_module_sizes

    lvlm = getattr(module, "lvlm", module)
    parameters = sum(p.numel() for p in lvlm.parameters())
    trainable = [p for p in lvlm.parameters() if p.requires_grad]
    weights = int(compute_module_sizes(lvlm)[""])
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = 2 * gradients
    shape = _llm_shape(lvlm.llm)
    element = 2 if lvlm.dtype in (torch.bfloat16, torch.float16) else 4  # autocast computes in the weights' dtype
    llm_trains = any(p.requires_grad for p in lvlm.llm.parameters())
    per_h, per_i = ACTIVATION_BYTES[(element, llm_trains)]
    h, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    per_token_layer = per_h * h + per_i * i
    if (config.attn_implementation or "sdpa") == "eager":
        per_token_layer += shape["heads"] * sequence * EAGER_SCORE_BYTES[element]
    tokens = batch * sequence
    targets = batch * max(sequence - image_tokens, 1)
    base = 2 * tokens * h * element + targets * shape["vocab"] * (element + 8)
    full = layers * tokens * per_token_layer
    checkpointed = layers * tokens * h * element + tokens * per_token_layer
    runtime_bytes = (_runtime_bytes() if runtime is None else runtime) if device == "cpu" else 0
    probe = MIR_FIT_MATRICES * h * h * 8 if config.observe.mir_every else 0
    return MemoryEstimate(
        parameters=parameters, trainable=sum(p.numel() for p in trainable), weights=weights, gradients=gradients,
        optimizer=optimizer, probe=probe, activations_checkpointing=base + checkpointed, activations_no_checkpointing=base + full,
        gradient_checkpointing=config.gradient_checkpointing, runtime=runtime_bytes,
        load_extra=load_extra if device == "cpu" else 0, batch=batch, sequence=sequence, device=device,
        breakdown={"embeddings_and_logits": base, "per_layer_per_token": per_token_layer, "layers": layers})


def dry_run(config: TrainConfig) -> MemoryEstimate:
    """`regap pretrain/finetune CONFIG --dry-run`: the configured model on the meta device, set
    up as training sets it up, and its per-device memory estimate (nothing is trained or written)."""
    from accelerate import init_empty_weights

    from regap.models.loading.build import replace_projector
    from regap.precision import resolve_torch_dtype
    from regap.train.config import derive_batch_layout, training_device
    from regap.train.setup import setup_model

    cfg = config.resolved()
    device = training_device(cfg)
    runtime = _runtime_bytes()  # before the tokenizer and processor load: the libraries alone
    lvlm, extra = meta_model(cfg.model, resolve_torch_dtype(cfg.dtype, device))
    if cfg.projector_type is not None:
        with init_empty_weights():
            replace_projector(lvlm, cfg.projector_type, **cfg.qformer.options())
    setup_model(lvlm, dataclasses.replace(cfg, projector=None), log=lambda message: None)
    per_device, _ = derive_batch_layout(cfg.global_batch_size, cfg.per_device_batch_size,
                                        cfg.gradient_accumulation_steps, 1)
    sequence, source = data_sequence_length(cfg, lvlm)
    estimate = estimate_memory(lvlm, cfg, batch=per_device, sequence=sequence, image_tokens=lvlm.tokens_per_image,
                               device=device, load_extra=extra, runtime=runtime)
    estimate.sequence_source = source
    return estimate


def data_sequence_length(cfg: TrainConfig, lvlm: LVLM) -> tuple[int, str]:
    """The longest of the data's first `LENGTH_SAMPLES` samples in tokens (rendered with the
    training template, image tokens included, at most ``max_length``), and where it came from."""
    from regap.data.llava_json import LlavaJsonDataset
    from regap.models.inputs import build_batch
    from regap.models.templates import get_template

    path = Path(cfg.data.json)
    if not path.is_file():
        return cfg.max_length, f"max_length: {path} does not exist yet"
    dataset = LlavaJsonDataset(path, cfg.data.image_root, max_items=LENGTH_SAMPLES)
    rows = dataset.to_llava_rows()
    if not rows:
        return cfg.max_length, f"max_length: no usable sample in {path}"
    role = {"human": "user", "gpt": "assistant"}
    conversations = [[{"role": role.get(turn["from"], turn["from"]), "content": turn["value"]}
                      for turn in row["conversations"]] for row in rows]
    built = build_batch(conversations, [1 if "image" in row else 0 for row in rows], tokenizer=lvlm.tokenizer,
                        template=get_template(cfg.template or lvlm.config.template, lvlm.tokenizer),
                        tokens_per_image=lvlm.tokens_per_image, add_generation_prompt=False, padding_side="right")
    longest = max(len(sample.ids) for sample in built.samples)
    return min(longest, cfg.max_length), f"the longest of {len(rows)} samples of {path.name}"
