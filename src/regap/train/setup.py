"""Everything a training run sets up before its first step: the model (build, freeze per stage,
LoRA, MoCa, gradient checkpointing), the optimizer, the Accelerator, the ReGap regulariser,
the data file and the probe set."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from regap.errors import RegapError
from regap.models.attention import llm_attention, set_llm_attention
from regap.models.inputs import ModelInputs
from regap.models.moca import MOCA_FILE, MoCa, load_moca
from regap.models.loading.presets import known_projector_type
from regap.train.collate import Collator, TrainSamples
from regap.train.config import TrainConfig, derive_batch_layout, training_device
from regap.train.distributed import is_sharded
from regap.train.hooks import HiddenCapture
from regap.train.module import TrainModule, trainable_parameters
from regap.train.observe import available_trackers
from regap.train.regap_loss import ReGapLoss
from regap.train.step import TrainStep

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

# ---------------------------------------------------------------------- the model


def build_model(config: TrainConfig) -> LVLM:
    """`config.model`, with a fresh projector of `projector_type` (sized by `qformer.*`) when set."""
    from regap.models.loading.load import build_base_model

    return build_base_model(config.model, dtype=config.dtype, projector_type=config.projector_type,
                            projector_options=config.qformer.options(), seed=config.seed)


def check_projector_early(config: TrainConfig) -> None:
    """`qformer.trainable: linear` on a model known not to have a Q-Former fails before data and weights load."""
    if config.qformer.trainable != "linear" or config.projector_type is not None:
        return
    kind = known_projector_type(config.model)
    if kind is not None and kind != "qformer":  # None: a folder or hub id, checked once loaded
        raise RegapError(f"config key 'qformer.trainable' is 'linear' but model {config.model!r} has a {kind!r} projector, "
                         "not a Q-Former (set projector_type: qformer, or model: tiny-qformer)")


def _apply_qformer_trainable(lvlm: LVLM, config: TrainConfig) -> None:
    """`qformer.trainable` (all | linear) on a Q-Former connector; null keeps the projector's own mode."""
    from regap.models.qformer import QFormerProjector

    mode = config.qformer.trainable
    if not isinstance(lvlm.projector, QFormerProjector):
        if mode == "linear":
            raise RegapError(f"config key 'qformer.trainable' is 'linear' but the model's projector is "
                             f"{lvlm.config.projector_type!r}, not a Q-Former")
        return
    lvlm.projector.set_trainable(mode or lvlm.projector.trainable)


def _projector_file(source: str) -> tuple[Path, Path | None]:
    path = Path(source)
    if path.is_dir():
        projector = path / "projector.safetensors"
        moca = path / MOCA_FILE
        return projector, moca if moca.is_file() else None
    return path, None


def setup_model(lvlm: LVLM, config: TrainConfig, log: Any = print) -> tuple[TrainModule, MoCa | None]:
    """Load the initial projector, freeze/unfreeze per stage, add LoRA / MoCa, checkpointing."""
    set_llm_attention(lvlm, config.attn_implementation)  # before LoRA wraps the LLM; None keeps the loaded kernel
    log(f"LLM attention: {llm_attention(lvlm)}")
    moca_init = None
    if config.projector:
        from regap.models import load_projector

        projector_path, moca_init = _projector_file(config.projector)
        load_projector(lvlm, projector_path)
        log(f"loaded projector {projector_path}")
    for module in (lvlm.vision, lvlm.llm):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    for parameter in lvlm.projector.parameters():
        parameter.requires_grad_(True)
    _apply_qformer_trainable(lvlm, config)  # a Q-Former may train its linear layer only (MiniGPT-4)
    if config.stage == 2 and config.tune == "full":
        for parameter in lvlm.llm.parameters():
            parameter.requires_grad_(True)
        lvlm.llm_origin = lvlm.llm_origin or "stage-2 full tuning"  # the `backbone` condition reloads llm_source
    elif config.stage == 2 and config.tune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules or "all-linear", task_type="CAUSAL_LM",
        )
        from regap.models.loading.saved import peft_wrapping

        with peft_wrapping():
            lvlm.llm = get_peft_model(lvlm.llm, lora)
    if config.moca.enabled:
        if moca_init is not None:
            lvlm.set_moca(load_moca(moca_init, lvlm.llm))
            log(f"loaded MoCa {moca_init}")
        elif lvlm.moca is None:  # a model that has MoCa already (`train(..., model=)`) keeps training it
            lvlm.set_moca(MoCa.for_llm(lvlm.llm, config.moca.layers))
    elif moca_init is not None:
        warnings.warn(f"{moca_init} is ignored: moca.enabled is false in this config", stacklevel=2)
    if lvlm.moca is not None:  # part of the model either way; trained only when enabled
        lvlm.moca.requires_grad_(config.moca.enabled)
    if config.mixed_precision != "no":
        # Trainable weights in float32 (autocast computes in bf16/fp16).
        for parameter in lvlm.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    elif lvlm.dtype in (torch.bfloat16, torch.float16):
        warnings.warn(f"training with {lvlm.dtype} weights and mixed_precision=no (pure low precision); "
                      "mixed_precision=bf16 keeps float32 trainable weights", stacklevel=2)
    if config.gradient_checkpointing:
        lvlm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = TrainModule(lvlm)
    module.train()
    lvlm.vision.eval()  # frozen; no dropout or statistics updates
    return module, lvlm.moca


def make_optimizer(module: TrainModule, config: TrainConfig) -> torch.optim.Optimizer:
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, parameter in trainable_parameters(module).items():
        is_moca = name.startswith("lvlm.moca.")
        lr = config.projector_lr if is_moca or name.startswith("lvlm.projector.") else config.lr
        decay = config.weight_decay if parameter.ndim >= 2 and not is_moca else 0.0
        groups.setdefault((lr, decay), []).append(parameter)
    if not groups:
        raise RegapError("nothing to train: no parameter requires a gradient")
    param_groups = [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def make_regap(config: TrainConfig, lvlm: LVLM, device: torch.device) -> tuple[ReGapLoss | None, HiddenCapture | None]:
    """The regulariser (None when `regap.lam` is 0) and, for a layer past the input, the hook
    that keeps that layer's output (layer 0's features come back from `TrainModule.forward`)."""
    spec = config.regap
    if spec.lam <= 0:
        return None, None
    regap = ReGapLoss(spec.lam, layer=spec.layer, distance=spec.distance, pooling=spec.pooling,
                      warmup_steps=spec.warmup_steps, norm_weight=spec.norm_weight, ridge=spec.ridge,
                      detach_text=spec.detach_text, text_tokens=spec.text_tokens).to(device)
    return regap, HiddenCapture(lvlm.llm, spec.layer) if spec.layer > 0 else None


def prepare_step(module: TrainModule, config: TrainConfig, accelerator: Any, total_steps: int,
                 regap: ReGapLoss | None, capture: HiddenCapture | None) -> TrainStep:
    """AdamW and the cosine schedule with warm-up, the module and optimizer prepared by the
    Accelerator, as the `TrainStep` that trains them."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = make_optimizer(module, config)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=math.ceil(total_steps * config.warmup_ratio),
                                                num_training_steps=total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    # More than one process: keep the projector in the graph of a batch without images (see compute_losses).
    keepalive = list(accelerator.unwrap_model(module).lvlm.projector.parameters()) if accelerator.num_processes > 1 \
        else None
    return TrainStep(module, optimizer, scheduler, accelerator=accelerator, regap=regap, capture=capture,
                     keepalive=keepalive, max_grad_norm=config.max_grad_norm,
                     stop_on_bad_grad_norm=config.mixed_precision != "fp16")  # fp16's loss scaler skips such steps


def warn_unusual_regap(config: TrainConfig) -> None:
    if config.stage == 2 and config.regap.lam > 0:
        warnings.warn("ReGap is on in stage 2 (regap.lam > 0): the ReGap paper reports that regularising the gap "
                      "during instruction tuning harms the model; it is meant for stage-1 pretraining", stacklevel=3)
    if config.regap.lam > 0 and config.regap.layer > 0:
        warnings.warn(f"ReGap at layer {config.regap.layer}: the paper's ablation found regularising later layers hurts "
                      "safety; layer 0 is the default", stacklevel=3)


# ---------------------------------------------------------------------- the Accelerator


def new_accelerator(config: TrainConfig, out_dir: Path) -> tuple[Any, int, int, list[str]]:
    """A fresh Accelerator for this run, the batch layout (per device, accumulation) for its
    number of processes, and the trackers that are installed."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    cpu = training_device(config) == "cpu"  # the device `dtype: auto` was resolved for
    # A fresh Accelerator per run (several runs may share one Python process, e.g. tests);
    # the process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    state = PartialState(cpu=cpu)
    per_device, accumulation = derive_batch_layout(
        config.global_batch_size, config.per_device_batch_size, config.gradient_accumulation_steps, state.num_processes,
    )
    with warnings.catch_warnings():
        if not state.is_main_process:
            warnings.simplefilter("ignore")
        trackers = available_trackers(config.observe.trackers)
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
        mixed_precision=config.mixed_precision, cpu=cpu, log_with=trackers or None, project_dir=str(out_dir),
    )
    if is_sharded(accelerator):
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = per_device
            ds["gradient_accumulation_steps"] = accumulation
            ds["train_batch_size"] = config.global_batch_size
            if config.max_grad_norm > 0:
                ds["gradient_clipping"] = config.max_grad_norm
    return accelerator, per_device, accumulation, trackers


# ---------------------------------------------------------------------- data


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes over its data."""

    steps_per_epoch: int
    total_steps: int
    n_epochs: int
    left_out: int  # samples per epoch in the incomplete last global batch

    @classmethod
    def of(cls, n_samples: int, config: TrainConfig) -> "StepPlan":
        steps_per_epoch = n_samples // config.global_batch_size
        total = config.max_steps or config.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, math.ceil(total / steps_per_epoch), n_samples % config.global_batch_size)


def resolve_data(config: TrainConfig, out_dir: Path, accelerator: Any, log: Any) -> tuple[Path, Path | None]:
    """The data file to read; synthesises it into OUT/data when missing and `data.synth` says so."""
    json_path = Path(config.data.json)
    image_root = Path(config.data.image_root) if config.data.image_root else None
    if json_path.is_file():
        return json_path, image_root
    if config.data.synth is None:
        raise RegapError(f"data file not found: {json_path} (set data.synth to generate synthetic data)")
    folder = out_dir / "data"
    target = folder / json_path.name
    if accelerator.is_main_process and not target.is_file():
        from regap.data.synth import generate_synthetic

        spec = config.data.synth
        log(f"{json_path} not found: generating {spec.n} synthetic samples (seed {spec.seed}) into {folder}")
        generate_synthetic(folder, spec.n, seed=spec.seed, image_size=spec.image_size, overwrite=True)
    accelerator.wait_for_everyone()
    if not target.is_file():
        raise RegapError(f"synthetic data has no {json_path.name} (it writes captions.json and instructions.json)")
    return target, image_root


def feature_cache(config: TrainConfig, lvlm: LVLM, accelerator: Any, log: Any) -> Any:
    """The frozen-vision-feature cache (`data.feature_cache`), or None. `auto` turns it on for CPU
    runs, where re-encoding the same images for every lambda and seed costs real time; on a GPU
    cluster the cache of a large data set would fill disks faster than it saves time."""
    wanted = config.data.feature_cache == "on" or (config.data.feature_cache == "auto"
                                                   and accelerator.device.type == "cpu")
    if not wanted or any(p.requires_grad for p in lvlm.vision.parameters()):
        return None
    from regap.cache import announce
    from regap.models.feature_cache import CacheUnwritable, VisionFeatureCache

    def warn(message: str) -> None:
        if accelerator.is_main_process:
            announce(message)

    try:
        cache = VisionFeatureCache(lvlm.vision, warn=warn)
    except CacheUnwritable as exc:
        warn(f"vision-feature cache not used ({exc}); training encodes every image")
        return None
    log(f"vision features cached in {cache.folder}")
    return cache


def probe_indices(n: int, k: int) -> list[int]:
    k = min(k, n)
    return sorted({int(i * n / k) for i in range(k)}) if k else []


def probe_batches(config: TrainConfig, collator: Collator, samples: TrainSamples, size: int) -> list[ModelInputs]:
    """The fixed probe set (`observe.probe_size` evenly spaced samples) as CPU batches; none
    when no probe is asked for."""
    if not (config.observe.gap_every or config.observe.mir_every):
        return []
    items = [samples[i] for i in probe_indices(len(samples), config.observe.probe_size)]
    return [collator(items[i: i + size]).inputs for i in range(0, len(items), size)]
