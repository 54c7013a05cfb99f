"""Stage-1 (projector pretraining, optionally with ReGap) and stage-2 (instruction tuning)
loops on Hugging Face Accelerate.

One function, :func:`train`, runs both stages from a :class:`TrainConfig`:

* stage 1: vision encoder and LLM frozen, the projector (and MoCa, when enabled) trains
  on captions with the ``plain`` template; ReGap adds ``lam * gap``;
* stage 2: projector + LLM (``tune: full``) or projector + LoRA adapters (``tune: lora``)
  on conversations with the model's chat template; ReGap is off by default.

The same code runs on one CPU, one GPU, or many GPUs under ``accelerate launch``
(DDP, FSDP, DeepSpeed ZeRO-2/3; configs in ``configs/``). The caption loss is the mean
over the target tokens of the global micro-batch and the ReGap statistics are pooled
over the global micro-batch, so numbers do not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regap.errors import RegapError, RunInterrupted
from regap.models.inputs import IGNORE_INDEX, ModelInputs
from regap.models.moca import MOCA_FILE, MoCa, load_moca, save_moca
from regap.provenance import file_sha256
from regap.train import checkpoint as ckpt
from regap.train.collate import Collator, StepSampler, TrainSamples
from regap.train.config import TrainConfig, config_differences, derive_batch_layout
from regap.train.distributed import all_reduce_sum
from regap.train.hooks import HiddenCapture, unwrap_llm
from regap.train.observe import MetricsLog, Progress, available_trackers, probe_gaps
from regap.train.regap_loss import GapOutput, ReGapLoss, corpus_token_counts, text_stats_from_counts

TINY_RANDOM = "tiny-random"
REGAP_STATE_FILE = "regap_state.safetensors"
TEXT_STATS_FILE = "text_stats.safetensors"


class NonFiniteLossError(RegapError):
    """The loss became NaN or inf; the run stopped before the optimizer step."""


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    total_steps: int
    status: str  # "completed" | "stopped"
    checkpoint: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)


class TrainModule(nn.Module):
    """The LVLM (with its MoCa, when enabled) as the module for `accelerator.prepare` (so DDP
    and friends synchronise every trainable parameter).

    ``forward`` writes the projected image tokens into the input embeddings (`LVLM.embed`)
    and runs the LLM without labels inside `LVLM.image_positions` (MoCa's hooks read the
    batch's image mask there, for that call only): the loss is computed outside, over the
    global batch. ``logits_positions`` (a 1-D tensor of sequence positions) limits the
    vocabulary projection to the positions that predict a target token (``logits_to_keep``),
    which saves most of the LM-head work in stage 1, where image tokens make up most of the
    sequence.
    """

    def __init__(self, lvlm: nn.Module) -> None:
        super().__init__()
        self.lvlm = lvlm
        self._keep_ok = "logits_to_keep" in inspect.signature(unwrap_llm(lvlm.llm).forward).parameters

    @property
    def moca(self) -> MoCa | None:
        return self.lvlm.moca

    def forward(self, inputs: ModelInputs, output_hidden_states: bool = False,
                logits_positions: torch.Tensor | None = None) -> Any:
        embeds = self.lvlm.embed(inputs)
        extra = {}
        if logits_positions is not None and self._keep_ok:  # host positions: an asynchronous copy, no wait
            extra["logits_to_keep"] = logits_positions.to(embeds.device, non_blocking=True)
        with self.lvlm.image_positions(inputs.image_mask):
            return self.lvlm.llm(inputs_embeds=embeds, attention_mask=inputs.attention_mask.to(embeds.device),
                                 output_hidden_states=output_hidden_states, use_cache=False, **extra)


# ---------------------------------------------------------------------- losses


@dataclass
class StepLosses:
    """One micro-batch's losses. ``total`` is the differentiable loss; the rest stays on the
    device and is read back only through the properties (by the steps that log)."""

    total: torch.Tensor
    caption_tensor: torch.Tensor
    caption_count: torch.Tensor  # target tokens of the global micro-batch
    regap_output: GapOutput | None = None

    @property
    def caption(self) -> float:
        return float(self.caption_tensor.detach())

    @property
    def gap(self) -> float | None:
        return None if self.regap_output is None else float(self.regap_output.gap.detach())

    @property
    def gap_loss(self) -> float | None:
        return None if self.regap_output is None else float(self.regap_output.loss.detach())

    @property
    def alpha(self) -> float | None:
        return None if self.regap_output is None else self.regap_output.alpha

    @property
    def caption_tokens(self) -> int:
        return int(self.caption_count)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is a target in at least one sample (1-D, sorted)."""
    has_target = (labels[:, 1:] != IGNORE_INDEX).any(0)
    return has_target.nonzero().flatten()


def caption_loss_terms(logits: torch.Tensor, labels: torch.Tensor,
                       positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over target tokens, and their count (local).

    ``logits`` cover all positions, or only ``positions`` (then ``[B, len(positions), V]``).
    """
    labels = labels.to(logits.device)
    if positions is None or logits.shape[1] == labels.shape[1]:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = labels[:, positions.to(labels.device, non_blocking=True) + 1]
    mask = targets != IGNORE_INDEX
    count = mask.sum()
    selected = logits[mask]  # no target: an empty selection, whose summed loss is 0 (still in the graph)
    selected = selected.to(torch.promote_types(selected.dtype, torch.float32))  # half -> float32
    return F.cross_entropy(selected, targets[mask], reduction="sum"), count


def compute_losses(module: nn.Module, inputs: ModelInputs, regap: ReGapLoss | None = None,
                   capture: HiddenCapture | None = None, keepalive: list[nn.Parameter] | None = None,
                   positions: torch.Tensor | None = None) -> StepLosses:
    """Forward pass + caption loss (global token mean) + ReGap; the value is the same on every process.

    ``positions`` (`target_positions` of the labels, computed on the host before the batch
    moves to the device, as the loop does) spares the device a read-back; by default they
    are computed from ``inputs.labels``. Nothing here converts a device value to a Python
    number: the logged values are read later, through `StepLosses`' properties. (Selecting
    the target rows of the logits still makes the device count them: the price of upcasting
    only those rows to float32.)
    """
    if positions is None:
        positions = target_positions(inputs.labels)
    out = module(inputs, logits_positions=positions)
    loss_sum, count = caption_loss_terms(out.logits, inputs.labels, positions)
    global_count = all_reduce_sum(count.detach().double(), grad=False)
    caption = all_reduce_sum(loss_sum) / global_count.clamp_min(1.0).to(loss_sum.dtype)
    total = caption
    result = None
    if regap is not None and capture is not None:
        features = capture.pop()
        result = regap(features, inputs.image_mask, inputs.attention_mask)
        total = total + result.loss.to(total.dtype)
    if keepalive and inputs.pixel_values is None:
        # No image in this process's batch: keep the projector in the graph with a zero
        # term so data-parallel gradient reduction sees every trainable parameter.
        total = total + sum(p.sum() for p in keepalive) * 0.0
    return StepLosses(total, caption.detach(), global_count, result)


# ---------------------------------------------------------------------- model set-up


def build_model(config: TrainConfig) -> Any:
    """`config.model`, with a fresh projector of `projector_type` (sized by `qformer.*`) when set."""
    options = config.qformer.options()
    if config.model == TINY_RANDOM:
        from regap.models.random_tiny import tiny_random_lvlm

        return tiny_random_lvlm(seed=config.seed, projector=config.projector_type or "mlp2x_gelu",
                                projector_options=options or None)
    from regap.models import load_model, replace_projector

    lvlm = load_model(config.model, dtype=config.dtype)
    if config.projector_type is not None:
        from regap.models.blip2_hf import is_blip2_hf

        if is_blip2_hf(lvlm.config):
            raise RegapError(f"config key 'projector_type' ({config.projector_type!r}) would replace the trained connector "
                             f"of the BLIP-2/InstructBLIP checkpoint {config.model}; leave it null for such models")
        replace_projector(lvlm, config.projector_type, **options)
    return lvlm


def _check_projector_early(config: TrainConfig) -> None:
    """`qformer.trainable: linear` on a model known not to have a Q-Former fails before data and weights load."""
    if config.qformer.trainable != "linear" or config.projector_type is not None:
        return
    from regap.models.presets import PRESETS

    preset = PRESETS.get(config.model)
    if config.model == TINY_RANDOM or (preset is not None and preset.llava_hf_id):
        kind = "mlp2x_gelu"
    elif preset is not None and preset.config is not None:
        kind = preset.config.projector_type
    else:  # a folder or hub id: checked once the model is loaded (`_apply_qformer_trainable`)
        return
    if kind != "qformer":
        raise RegapError(f"config key 'qformer.trainable' is 'linear' but model {config.model!r} has a {kind!r} projector, "
                         "not a Q-Former (set projector_type: qformer, or model: tiny-qformer)")


def _apply_qformer_trainable(lvlm: Any, config: TrainConfig) -> None:
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


def setup_model(lvlm: Any, config: TrainConfig, log: Any = print) -> tuple[TrainModule, MoCa | None]:
    """Load the initial projector, freeze/unfreeze per stage, add LoRA / MoCa, checkpointing."""
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


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


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


# ---------------------------------------------------------------------- data


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


def probe_indices(n: int, k: int) -> list[int]:
    k = min(k, n)
    return sorted({int(i * n / k) for i in range(k)}) if k else []


# ---------------------------------------------------------------------- text statistics (frechet)


def _uses_corpus_stats(config: TrainConfig, lvlm: Any) -> bool:
    spec = config.regap
    if spec.distance != "frechet":
        return False
    embeddings_frozen = not lvlm.llm.get_input_embeddings().weight.requires_grad
    if spec.text_stats == "corpus":
        if spec.layer != 0:
            raise RegapError("regap.text_stats=corpus needs regap.layer=0 (the text side is the embedding table only there)")
        if not embeddings_frozen:
            warnings.warn("regap.text_stats=corpus while the input embeddings train: the cached text statistics go stale",
                          stacklevel=2)
        return True
    return spec.text_stats == "auto" and spec.layer == 0 and embeddings_frozen


def prepare_text_stats(regap: ReGapLoss, lvlm: Any, dataset: Any, config: TrainConfig, data_sha: str,
                       out_dir: Path, accelerator: Any, log: Any) -> None:
    """Mean, covariance and its square root of the corpus's layer-0 text tokens, cached."""
    from regap.cache import cache_dir
    from regap.models.templates import get_template

    weight = lvlm.llm.get_input_embeddings().weight
    key_data = {
        "model": config.model, "llm": lvlm.config.llm_source, "template": config.template or lvlm.config.template,
        "data_sha256": data_sha, "max_length": config.max_length, "max_items": config.data.max_items,
        "shape": list(weight.shape), "weight_sum": float(weight.detach().double().sum()),
        "ridge": config.regap.ridge, "tokens_per_image": lvlm.tokens_per_image,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    cached = cache_dir("train", "text_stats") / f"{key}.safetensors"
    if accelerator.is_main_process and not cached.is_file():
        log("computing the corpus text statistics for the Fréchet ReGap (once, then cached)")
        template = get_template(config.template or lvlm.config.template, lvlm.tokenizer)
        conversations = [[{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                          for t in row["conversations"]] for row in dataset.to_llava_rows()]
        counts = corpus_token_counts(conversations, lvlm.tokenizer, template, tokens_per_image=lvlm.tokens_per_image,
                                     max_length=config.max_length, vocab_size=weight.shape[0])
        device = accelerator.device
        mean, cov = text_stats_from_counts(weight.detach().to(device), counts)
        probe = ReGapLoss(ridge=config.regap.ridge)
        probe.set_text_stats(mean, cov)
        ckpt.save_tensors_atomic({"mean": mean, "cov": cov, "sqrt_cov": probe.text_sqrt_cov}, cached,
                                 metadata={"key": json.dumps(key_data)})
    accelerator.wait_for_everyone()
    stats = ckpt.load_tensors(cached)
    device = accelerator.device
    regap.set_text_stats(stats["mean"].to(device), stats["cov"].to(device), stats["sqrt_cov"].to(device))
    if accelerator.is_main_process:
        shutil.copyfile(cached, out_dir / TEXT_STATS_FILE)


# ---------------------------------------------------------------------- checkpoints


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def _deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _trainable_state(accelerator: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    unwrapped = accelerator.unwrap_model(module)
    names = set(trainable_parameters(unwrapped))
    if _sharded(accelerator):
        state = accelerator.get_state_dict(module)
        return {k: v for k, v in state.items() if k in names}
    return {k: v.detach() for k, v in unwrapped.named_parameters() if k in names}


def save_checkpoint(accelerator: Any, out_dir: Path, step: int, state: dict[str, Any], module: nn.Module,
                    optimizer: Any, scheduler: Any, regap: ReGapLoss | None, keep: int) -> Path:
    folder = out_dir / "checkpoints"
    final = folder / ckpt.checkpoint_name(step)
    tmp = folder / (final.name + ".tmp")
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    trainable = _trainable_state(accelerator, module)  # collective under ZeRO-3 / FSDP
    if _sharded(accelerator):
        # DeepSpeed: leave the frozen backbone out of every checkpoint (it is rebuilt from its source).
        kwargs = {"exclude_frozen_parameters": True} if _deepspeed(accelerator) else {}
        accelerator.save_state(str(tmp / "accelerate"), **kwargs)
    ckpt.torch_save_atomic(ckpt.rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(module)
        ckpt.save_tensors_atomic(trainable, tmp / "trainable.safetensors")
        from regap.models import save_projector

        save_projector(unwrapped.lvlm, tmp / "projector.safetensors", metadata={"step": str(step)})
        if unwrapped.moca is not None:
            save_moca(unwrapped.moca, tmp / MOCA_FILE)
        if regap is not None:
            ckpt.save_tensors_atomic(dict(regap.state_dict()), tmp / REGAP_STATE_FILE)
        if hasattr(unwrapped.lvlm.llm, "peft_config"):  # LoRA: the adapter in peft's own format too
            _save_adapter(unwrapped.lvlm.llm, tmp / "adapter", trainable)
        if not _sharded(accelerator):
            ckpt.torch_save_atomic(optimizer.state_dict(), tmp / "optimizer.pt")
        ckpt.torch_save_atomic(scheduler.state_dict(), tmp / "scheduler.pt")
        ckpt.write_json_atomic(tmp / "state.json", {"format": ckpt.FORMAT, **state})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ckpt.write_json_atomic(folder / ckpt.LATEST, {"checkpoint": final.name, "step": step})
        ckpt.rotate(folder, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: Path, module: nn.Module, optimizer: Any, scheduler: Any,
                    regap: ReGapLoss | None) -> dict[str, Any]:
    state = ckpt.read_state(checkpoint)
    unwrapped = accelerator.unwrap_model(module)
    if _sharded(accelerator):
        kwargs = {"load_module_strict": False} if _deepspeed(accelerator) else {}
        accelerator.load_state(str(checkpoint / "accelerate"), **kwargs)
    else:
        tensors = ckpt.load_tensors(checkpoint / "trainable.safetensors")
        expected = trainable_parameters(unwrapped)
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise RegapError(f"{checkpoint}: trainable parameters do not match this run "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, parameter in expected.items():
                parameter.copy_(tensors[name].to(parameter.dtype))
        # Loaded on the CPU; Optimizer.load_state_dict moves the states to their parameters' devices.
        optimizer.load_state_dict(ckpt.load_plain(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(ckpt.load_plain(checkpoint / "scheduler.pt"))
    if regap is not None:
        path = checkpoint / REGAP_STATE_FILE
        if path.is_file():
            regap.load_state_dict({k: v.to(accelerator.device) for k, v in ckpt.load_tensors(path).items()}, strict=False)
    rng_file = checkpoint / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        ckpt.set_rng_state(ckpt.load_plain(rng_file))
    else:
        warnings.warn(f"{checkpoint} has no RNG state for process {accelerator.process_index} "
                      "(different number of processes?): dropout noise will differ from an uninterrupted run",
                      stacklevel=2)
    return state


# ---------------------------------------------------------------------- final artefacts


def save_outputs(accelerator: Any, out_dir: Path, module: nn.Module, config: TrainConfig, regap: ReGapLoss | None,
                 step: int) -> None:
    """Projector (+ MoCa, ReGap state) for every stage; LoRA adapter or full LLM for stage 2."""
    unwrapped = accelerator.unwrap_model(module)
    lvlm = unwrapped.lvlm
    full_state = accelerator.get_state_dict(module) if (_sharded(accelerator) and config.tune == "full") else None
    trainable = _trainable_state(accelerator, module) if config.tune == "lora" else {}
    if not accelerator.is_main_process:
        return
    from regap.models import save_model, save_projector

    meta = {"stage": str(config.stage), "step": str(step)}
    if config.stage == 2 and config.tune == "full":
        staging = out_dir / "model.partial"
        shutil.rmtree(staging, ignore_errors=True)
        if full_state is None:
            save_model(lvlm, staging, include_backbones=True)
        else:
            save_model(lvlm, staging, include_backbones=False)
            llm_state = {k[len("lvlm.llm."):]: v for k, v in full_state.items() if k.startswith("lvlm.llm.")}
            lvlm.llm.save_pretrained(staging / "llm", state_dict=llm_state, safe_serialization=True)
            lvlm.tokenizer.save_pretrained(staging / "llm")
        shutil.rmtree(out_dir / "model", ignore_errors=True)
        os.replace(staging, out_dir / "model")
    if config.stage == 2 and config.tune == "lora":
        staging = out_dir / "adapter.partial"
        shutil.rmtree(staging, ignore_errors=True)
        _save_adapter(lvlm.llm, staging, trainable)
        shutil.rmtree(out_dir / "adapter", ignore_errors=True)
        os.replace(staging, out_dir / "adapter")
    save_projector(lvlm, out_dir / "projector.safetensors", metadata=meta)
    if config.model != TINY_RANDOM and not (config.stage == 2 and config.tune == "lora"):
        record = {"format": "regap-lvlm/1", "config": lvlm.config.to_dict(), "includes_backbones": False,
                  "dtype": config.dtype, "trained_by": "regap.train", **meta}
        ckpt.write_json_atomic(out_dir / "regap_config.json", record)
    if unwrapped.moca is not None:
        save_moca(unwrapped.moca, out_dir / MOCA_FILE)
    if regap is not None:
        ckpt.save_tensors_atomic(dict(regap.state_dict()), out_dir / REGAP_STATE_FILE)


def _save_adapter(peft_model: Any, folder: Path, trainable: dict[str, torch.Tensor]) -> None:
    """peft `save_pretrained`, from the (possibly gathered) trainable weights."""
    prefix = "lvlm.llm."
    state = {k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix)}
    peft_model.save_pretrained(str(folder), state_dict=state or None)


def load_trained(out_dir: str | Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu") -> Any:
    """Rebuild a trained model from a training output folder: base model + projector
    (+ LoRA adapter or full LLM) + MoCa, which the returned LVLM applies by itself
    (`regap.models.load_model` and every ``--model OUT`` come here)."""
    out_dir = Path(out_dir)
    from regap.train.config import read_yaml

    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    config = TrainConfig.from_dict(read_yaml(out_dir / "config.yaml"))
    if not (out_dir / "projector.safetensors").is_file():
        raise RegapError(f"{out_dir}: no projector.safetensors (the training has not finished; its checkpoints "
                         f"are in {out_dir / 'checkpoints'})")
    if (out_dir / "model").is_dir():
        from regap.models import load_model

        lvlm = load_model(str(out_dir / "model"), dtype=dtype or config.dtype, device=device)
    else:
        lvlm = build_model(config if dtype is None else _with(config, dtype=dtype)).to(device)
        from regap.models import load_projector

        load_projector(lvlm, out_dir / "projector.safetensors")
        if (out_dir / "adapter").is_dir():
            from peft import PeftModel

            lvlm.llm = PeftModel.from_pretrained(lvlm.llm, str(out_dir / "adapter"))
    if lvlm.moca is None and (out_dir / MOCA_FILE).is_file():  # `model/` (full stage 2) may hold it already
        lvlm.set_moca(load_moca(out_dir / MOCA_FILE, lvlm.llm))
    return lvlm.eval()


def _with(config: TrainConfig, **changes: Any) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------------- the loop


def _new_accelerator(config: TrainConfig, out_dir: Path) -> tuple[Any, int, int, list[str]]:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    cpu = config.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
        or not torch.cuda.is_available()
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
    if _sharded(accelerator):
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = per_device
            ds["gradient_accumulation_steps"] = accumulation
            ds["train_batch_size"] = config.global_batch_size
            if config.max_grad_norm > 0:
                ds["gradient_clipping"] = config.max_grad_norm
    return accelerator, per_device, accumulation, trackers


def _feature_cache(cfg: TrainConfig, lvlm: Any, accelerator: Any, log: Any) -> Any:
    """The frozen-vision-feature cache (`data.feature_cache`), or None. `auto` turns it on for CPU
    runs, where re-encoding the same images for every lambda and seed costs real time; on a GPU
    cluster the cache of a large data set would fill disks faster than it saves time."""
    wanted = cfg.data.feature_cache == "on" or (cfg.data.feature_cache == "auto" and accelerator.device.type == "cpu")
    if not wanted or any(p.requires_grad for p in lvlm.vision.parameters()):
        return None
    from regap.models.feature_cache import VisionFeatureCache

    cache = VisionFeatureCache(lvlm.vision)
    log(f"vision features cached in {cache.folder}")
    return cache


def _to_cpu_batches(collator: Collator, samples: TrainSamples, indices: list[int], size: int) -> list[ModelInputs]:
    items = [samples[i] for i in indices]
    return [collator(items[i: i + size]).inputs for i in range(0, len(items), size)]


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, model: Any = None,
          command: str | None = None) -> TrainResult:
    """Run stage 1 or 2 as configured; write everything under ``out_dir``.

    ``model`` (optional) is an already built `LVLM` to train instead of ``config.model``.
    ``resume`` continues from the newest checkpoint in ``out_dir`` (a fresh start when
    there is none). Raises `NonFiniteLossError` when the loss becomes NaN/inf.
    """
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    cfg = config.resolved()
    if model is None:
        _check_projector_early(cfg)
    from regap.checks import prepare_out_dir

    out_dir = prepare_out_dir(out_dir)
    accelerator, per_device, accumulation, trackers = _new_accelerator(cfg, out_dir)
    main = accelerator.is_main_process
    world = accelerator.num_processes
    ckpt_dir = out_dir / "checkpoints"
    log_file = out_dir / "train.log"

    def log(message: str) -> None:
        if main:
            with log_file.open("a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            if cfg.observe.progress:
                print(message, flush=True)

    # ---- output folder and config
    existing = ckpt.latest_checkpoint(ckpt_dir)
    if existing is not None and not resume:
        raise RegapError(f"{out_dir} already holds checkpoints ({existing.name}); pass --resume to continue it, "
                         "or choose another --out")
    resume_from = existing if resume else None
    if resume and existing is None:
        log(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    saved = cfg.to_dict()
    saved["per_device_batch_size"], saved["gradient_accumulation_steps"] = per_device, accumulation
    if resume_from is not None and (out_dir / "config.yaml").is_file():
        from regap.train.config import read_yaml

        changed = config_differences(read_yaml(out_dir / "config.yaml"), saved)
        if changed:
            raise RegapError(f"cannot resume {out_dir}: the config differs in {', '.join(changed)} "
                             "(only run-control keys such as stop_after_steps, save_every, observe.* may change)")
    if main:
        import yaml

        header = (f"# regap training config as used (stage {cfg.stage}); batch layout derived for {world} "
                  f"process(es): {per_device} per device x {accumulation} accumulation x {world}\n")
        tmp = out_dir / "config.yaml.tmp"
        tmp.write_text(header + yaml.safe_dump(saved, sort_keys=False), encoding="utf-8")
        os.replace(tmp, out_dir / "config.yaml")

    set_seed(cfg.seed)
    if cfg.stage == 2 and cfg.regap.lam > 0:
        warnings.warn("ReGap is on in stage 2 (regap.lam > 0): the ReGap paper reports that regularising the gap "
                      "during instruction tuning harms the model; it is meant for stage-1 pretraining", stacklevel=2)
    if cfg.regap.lam > 0 and cfg.regap.layer > 0:
        warnings.warn(f"ReGap at layer {cfg.regap.layer}: the paper's ablation found regularising later layers hurts "
                      "safety; layer 0 is the default", stacklevel=2)

    # ---- data (before the model: a bad path fails before minutes of loading)
    json_path, image_root = resolve_data(cfg, out_dir, accelerator, log)
    from regap.data.llava_json import LlavaJsonDataset

    dataset = LlavaJsonDataset(json_path, image_root, max_items=cfg.data.max_items)
    data_sha = file_sha256(json_path)
    if resume_from is not None:
        _check_resume_data(resume_from, json_path, data_sha)
    report = dataset.report
    if main:
        dataset.write_report(out_dir / "data_report.json")
        if report.missing_images:
            log(f"{len(report.missing_images)} sample(s) skipped: image missing from {dataset.image_root} "
                f"(listed in {out_dir / 'data_report.json'})")
        if report.malformed:
            log(f"{len(report.malformed)} malformed row(s) skipped (listed in {out_dir / 'data_report.json'})")
    if len(dataset) < cfg.global_batch_size:
        raise RegapError(f"{json_path}: {len(dataset)} usable samples, fewer than one global batch "
                         f"({cfg.global_batch_size}); lower global_batch_size")

    # ---- model
    lvlm = model if model is not None else build_model(cfg)
    module, _ = setup_model(lvlm, cfg, log)
    n_trainable = sum(p.numel() for p in trainable_parameters(module).values())
    log(f"stage {cfg.stage} ({cfg.tune}): {n_trainable:,} trainable parameters; {world} process(es), "
        f"{per_device} per device x {accumulation} accumulation = global batch {cfg.global_batch_size}")

    samples = TrainSamples(dataset)
    features = _feature_cache(cfg, lvlm, accelerator, log)
    collator = Collator(lvlm, cfg.template, cfg.max_length, image_keys=features is not None)
    steps_per_epoch = len(dataset) // cfg.global_batch_size
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    if len(dataset) % cfg.global_batch_size:
        log(f"{len(dataset) % cfg.global_batch_size} sample(s) per epoch left out (incomplete last global batch)")

    # ---- ReGap
    regap = capture = None
    if cfg.regap.lam > 0:
        spec = cfg.regap
        regap = ReGapLoss(spec.lam, layer=spec.layer, distance=spec.distance, pooling=spec.pooling,
                          warmup_steps=spec.warmup_steps, norm_weight=spec.norm_weight, ridge=spec.ridge,
                          detach_text=spec.detach_text).to(accelerator.device)
        capture = HiddenCapture(lvlm.llm, spec.layer)
        if _uses_corpus_stats(cfg, lvlm):
            prepare_text_stats(regap, lvlm, dataset, cfg, data_sha, out_dir, accelerator, log)

    # ---- optimisation
    optimizer = make_optimizer(module, cfg)
    warmup = math.ceil(total_steps * cfg.warmup_ratio)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    keepalive = list(accelerator.unwrap_model(module).lvlm.projector.parameters()) if world > 1 else None

    # ---- probe set (fixed): evenly spaced samples of the data
    probe_batches = []
    if cfg.observe.gap_every or cfg.observe.mir_every:
        probe_batches = _to_cpu_batches(collator, samples, probe_indices(len(dataset), cfg.observe.probe_size),
                                        per_device)

    # ---- resume
    step = 0
    issues = _DataIssues()
    metrics = MetricsLog(out_dir / "metrics.jsonl", accelerator, enabled=main)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, module, optimizer, scheduler, regap)
        if state["global_batch_size"] != cfg.global_batch_size:
            raise RegapError(f"cannot resume: the checkpoint used global batch {state['global_batch_size']}")
        step = int(state["step"])
        issues.skipped = list(state.get("skipped_images", []))
        issues.truncated = int(state.get("truncated", 0))
        log(f"resumed from {resume_from} at step {step}/{total_steps}")
    metrics.truncate_after(step)  # rows past the checkpoint (or of a failed first attempt) are redone

    if main:
        _write_provenance(out_dir, cfg, lvlm, json_path, data_sha, dataset, world, per_device, accumulation,
                          accelerator, command, status="running", step=step)
    if trackers:
        accelerator.init_trackers(cfg.observe.project, config=_flat(saved))

    progress = Progress(total_steps, step, enabled=main and cfg.observe.progress, desc=f"stage {cfg.stage}")
    last_checkpoint = resume_from
    last_row: dict[str, Any] = {}
    status = "completed"
    window = _Window()
    t_step = time.perf_counter()
    t_start = t_step
    start_step = step

    def checkpoint_state() -> dict[str, Any]:
        return {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                "samples_seen": step * cfg.global_batch_size, "total_steps": total_steps,
                "global_batch_size": cfg.global_batch_size, "world_size": world, "per_device_batch_size": per_device,
                "gradient_accumulation_steps": accumulation, "seed": cfg.seed, "skipped_images": issues.skipped,
                "truncated": issues.truncated, "data_sha256": data_sha, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(at_step: int) -> Path:
        path = save_checkpoint(accelerator, out_dir, at_step, checkpoint_state(), module, optimizer, scheduler,
                               regap, cfg.keep_checkpoints)
        if main:
            _write_data_report(out_dir, dataset, issues.skipped, issues.truncated)
        return path

    try:
        done = step >= total_steps
        epoch = step // steps_per_epoch
        while not done and epoch < n_epochs:
            sampler = StepSampler(len(dataset), global_batch=cfg.global_batch_size, per_device=per_device,
                                  accumulation=accumulation, num_processes=world,
                                  process_index=accelerator.process_index, seed=cfg.seed, epoch=epoch,
                                  start_step=step - epoch * steps_per_epoch)
            loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collator,
                                                 num_workers=cfg.data.num_workers,
                                                 pin_memory=accelerator.device.type == "cuda",
                                                 # worker seeds from their own generator: creating the
                                                 # loader must not draw from the global RNG (exact resume)
                                                 generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for batch in loader:
                inputs = batch.inputs.to(accelerator.device)
                if features is not None and inputs.pixel_values is not None:
                    inputs.image_features = features.features(batch.image_keys, inputs.pixel_values)
                with accelerator.accumulate(module):
                    losses = compute_losses(module, inputs, regap, capture, keepalive,
                                            positions=target_positions(batch.inputs.labels))  # host labels
                    if not bool(torch.isfinite(losses.total.detach())):
                        raise NonFiniteLossError(_non_finite_message(losses, step + 1, batch.ids, last_checkpoint))
                    accelerator.backward(losses.total)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
                        # fp16's loss scaler skips overflowing steps by itself; otherwise stop before the step
                        if grad_norm is not None and cfg.mixed_precision != "fp16" \
                                and not math.isfinite(float(grad_norm)):
                            raise NonFiniteLossError(_non_finite_message(losses, step + 1, batch.ids, last_checkpoint,
                                                                         what="gradient norm"))
                    group = optimizer.param_groups[0]
                    lr_factor = group["lr"] / group.get("initial_lr", group["lr"] or 1.0)  # used by this step
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if capture is not None:
                    capture.clear()
                window.add(losses, batch)
                issues.add(batch)
                if not accelerator.sync_gradients:
                    continue
                # ---- one optimizer step done
                step += 1
                if issues.sync(accelerator) and main:
                    warnings.warn(f"conversation(s) longer than max_length={cfg.max_length} tokens are truncated "
                                  "(counted in metrics.jsonl and data_report.json)", stacklevel=2)
                if regap is not None:
                    regap.step()
                now = time.perf_counter()
                gap_due = cfg.observe.gap_every and (step % cfg.observe.gap_every == 0 or step == total_steps)
                mir_due = cfg.observe.mir_every and (step % cfg.observe.mir_every == 0 or step == total_steps)
                probing = bool(probe_batches and (gap_due or mir_due))
                logged = step % cfg.observe.log_every == 0 or step == total_steps or probing
                stopping = cfg.stop_after_steps is not None and step >= cfg.stop_after_steps
                # Device values (losses, alpha, grad norm) are read back only for a row that is
                # written (or returned): other steps queue their work without waiting for the device.
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                       **(window.summary() if logged or stopping else {}),
                       "lr": cfg.lr * lr_factor, "lr_projector": cfg.projector_lr * lr_factor,
                       "samples_per_s": cfg.global_batch_size / max(now - t_step, 1e-9)}
                if logged or stopping:
                    row.update({"alpha": regap.alpha if regap is not None else None,
                                "alpha_frozen": regap.frozen if regap is not None else None,
                                "grad_norm": float(grad_norm) if grad_norm is not None else None})
                row.update({"truncated": issues.truncated, "skipped_images": len(issues.skipped),
                            "elapsed_s": round(now - t_start, 3)})
                t_step = now
                window = _Window()
                if probing:
                    row.update(probe_gaps(accelerator.unwrap_model(module), probe_batches, accelerator.device,
                                          with_mir=bool(mir_due), autocast=accelerator.autocast))
                    if capture is not None:
                        capture.clear()
                    t_step = time.perf_counter()  # probe time is not training throughput
                if logged:
                    metrics.write(row)
                progress.update(row)
                last_row = row
                if step % cfg.save_every == 0 or step == total_steps:
                    last_checkpoint = save(step)
                if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps and step < total_steps:
                    if last_checkpoint is None or last_checkpoint.name != ckpt.checkpoint_name(step):
                        last_checkpoint = save(step)
                    status = "stopped"
                    done = True
                    break
                if step >= total_steps:
                    done = True
                    break
            epoch += 1
    except KeyboardInterrupt:
        if world == 1 and step > start_step and (last_checkpoint is None or
                                                  last_checkpoint.name != ckpt.checkpoint_name(step)):
            last_checkpoint = save(step)
        where = (f"training stopped at step {step}/{total_steps}; "
                 + (f"last checkpoint {last_checkpoint}" if last_checkpoint is not None else "no checkpoint yet"))
        if main:
            _write_provenance(out_dir, cfg, lvlm, json_path, data_sha, dataset, world, per_device, accumulation,
                              accelerator, command, status="interrupted", step=step,
                              checkpoint=str(last_checkpoint) if last_checkpoint is not None else None)
        log(f"interrupted: {where}; continue with --resume")
        raise RunInterrupted(where, resume=f"continue with --resume --out {out_dir}") from None
    except NonFiniteLossError as exc:
        if main:
            metrics.write({"event": "non_finite_loss", "step": step + 1, "message": str(exc)})
            _write_provenance(out_dir, cfg, lvlm, json_path, data_sha, dataset, world, per_device, accumulation,
                              accelerator, command, status="failed: non-finite loss", step=step)
        raise
    finally:
        progress.close()
        if capture is not None:
            capture.remove()
        if trackers:
            accelerator.end_training()

    save_outputs(accelerator, out_dir, module, cfg, regap, step)
    if main:
        _write_data_report(out_dir, dataset, issues.skipped, issues.truncated)
        _write_provenance(out_dir, cfg, lvlm, json_path, data_sha, dataset, world, per_device, accumulation,
                          accelerator, command, status=status, step=step,
                          alpha=regap.alpha if regap is not None else None)
        log(f"{status} at step {step}/{total_steps}; outputs in {out_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, step, total_steps, status, last_checkpoint, last_row)


# ---------------------------------------------------------------------- helpers


class _Window:
    """Averages over the micro-batches of one optimizer step: summed on the device (float64),
    read back in one transfer by `summary`, which only logged steps call."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: torch.Tensor | None = None  # loss, caption loss, gap, gap loss
        self.has_gap = False
        self.samples = 0

    def add(self, losses: StepLosses, batch: Any) -> None:
        self.n += 1
        total = losses.total.detach().double()
        gap = losses.regap_output
        if gap is not None:
            self.has_gap = True
        zero = torch.zeros_like(total)
        values = torch.stack([total, losses.caption_tensor.double(), gap.gap.detach().double() if gap is not None else zero,
                              gap.loss.detach().double() if gap is not None else zero])
        self.sums = values if self.sums is None else self.sums + values
        self.samples += batch.n_samples

    def summary(self) -> dict[str, Any]:
        n = max(self.n, 1)
        loss, caption, gap, gap_loss = (self.sums / n).tolist() if self.sums is not None else [0.0] * 4
        out: dict[str, Any] = {"loss": loss, "caption_loss": caption}
        out["gap"] = gap if self.has_gap else None
        out["gap_loss"] = gap_loss if self.has_gap else None
        return out


class _DataIssues:
    """Truncated conversations and corrupt images, pooled over processes once per optimizer step."""

    def __init__(self) -> None:
        self.truncated = 0
        self.skipped: list[dict[str, Any]] = []
        self._pending_truncated = 0
        self._pending_skipped: list[dict[str, Any]] = []

    def add(self, batch: Any) -> None:
        self._pending_truncated += batch.truncated
        self._pending_skipped += batch.skipped

    def sync(self, accelerator: Any) -> bool:
        """Fold the pending counts in; True when the first truncation was just seen."""
        before = self.truncated
        if accelerator.num_processes == 1:
            truncated, skipped = self._pending_truncated, self._pending_skipped
        else:
            counts = torch.tensor([self._pending_truncated, len(self._pending_skipped)], dtype=torch.float64,
                                  device=accelerator.device)
            counts = all_reduce_sum(counts, grad=False)
            truncated, skipped = int(counts[0]), []
            if int(counts[1]):
                from accelerate.utils import gather_object

                skipped = [entry for part in gather_object([self._pending_skipped]) for entry in part]
        self.truncated += truncated
        self.skipped += skipped
        self._pending_truncated, self._pending_skipped = 0, []
        return before == 0 and self.truncated > 0


def _non_finite_message(losses: StepLosses, step: int, ids: list[str], last: Path | None, what: str = "loss") -> str:
    where = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written yet"
    gap = f", gap {losses.gap}" if losses.gap is not None else ""
    return (f"non-finite {what} (loss {float(losses.total.detach())}: caption {losses.caption}{gap}) at step {step} "
            f"(samples {', '.join(ids[:4])}{'...' if len(ids) > 4 else ''}); stopped before the optimizer step, "
            f"{where}. Lower lr, use bf16 rather than fp16, or check the data; then continue with --resume")


def _check_resume_data(checkpoint: Path, json_path: Path, data_sha: str) -> None:
    """Refuse to resume on other training data: the sample order and every step so far
    assume the rows the checkpoint was trained on (same path, other rows is silent otherwise)."""
    stored = ckpt.read_state(checkpoint).get("data_sha256")
    if stored is None:  # checkpoints written before the hash was stored
        warnings.warn(f"{checkpoint} does not record its training data's sha256; cannot check that {json_path} "
                      "is unchanged", stacklevel=3)
    elif stored != data_sha:
        raise RegapError(f"cannot resume {checkpoint.parent.parent}: the training data {json_path} changed since the "
                         f"checkpoint (sha256 {data_sha[:12]}..., checkpoint has {stored[:12]}...); restore the data "
                         "or start a new run with another --out")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value if value is not None else "null"
        else:
            out[name] = str(value)
    return out


def _write_data_report(out_dir: Path, dataset: Any, skipped: list[dict[str, Any]], truncated: int) -> None:
    report = dataset.report.to_dict()
    unique = {(s.get("index"), s.get("image")): s for s in skipped}
    report.update({"n_corrupt_images": len(unique), "corrupt_images": list(unique.values()),
                   "n_truncated": truncated})
    ckpt.write_json_atomic(out_dir / "data_report.json", report)


def _write_provenance(out_dir: Path, cfg: TrainConfig, lvlm: Any, json_path: Path, data_sha: str, dataset: Any,
                      world: int, per_device: int, accumulation: int, accelerator: Any, command: str | None,
                      **extra: Any) -> None:
    from regap.provenance import json_hash, provenance

    record = provenance(
        command=command, stage=cfg.stage, tune=cfg.tune, model=cfg.model, model_config=lvlm.config.to_dict(),
        data={"json": str(json_path), "sha256": data_sha, "image_root": str(dataset.image_root),
              "loaded": len(dataset), "missing_images": len(dataset.report.missing_images),
              "malformed": len(dataset.report.malformed)},
        seed=cfg.seed, config_sha=json_hash(cfg.to_dict()), world_size=world, per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation, global_batch_size=cfg.global_batch_size,
        mixed_precision=cfg.mixed_precision, distributed_type=str(accelerator.distributed_type),
        device=str(accelerator.device), **extra,
    )
    ckpt.write_json_atomic(out_dir / "provenance.json", record)

