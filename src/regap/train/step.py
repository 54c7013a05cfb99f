"""One training step: a micro-batch -> losses -> backward -> (on the last micro-batch of an
accumulation) clipping, optimizer, scheduler and ReGap warm-up steps.

`TrainStep` is that step, used by the training loop and by ``bench/train.py`` alike, so a
benchmark times the code that trains. `compute_losses` is its forward part: the caption loss
is the mean over the target tokens of the global micro-batch and the ReGap statistics are
pooled over the global micro-batch, so numbers do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from regap.errors import RegapError
from regap.models.inputs import IGNORE_INDEX, ModelInputs
from regap.train.distributed import all_reduce_sum
from regap.train.hooks import HiddenCapture
from regap.train.regap_loss import GapOutput, ReGapLoss


class NonFiniteLossError(RegapError):
    """The loss became NaN or inf; the run stopped before the optimizer step."""


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

    ReGap's features: at layer 0 the ``inputs_embeds`` the forward returns (`TrainOutput`);
    at a later layer (or whenever one is given) what ``capture`` kept during the forward.
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
    if regap is not None:
        if capture is not None:
            features = capture.pop()
        elif regap.layer == 0:
            features = out.inputs_embeds
        else:
            raise ValueError(f"ReGap at layer {regap.layer} needs a HiddenCapture on that layer")
        result = regap(features, inputs.image_mask, inputs.attention_mask)
        total = total + result.loss.to(total.dtype)
    if keepalive and inputs.pixel_values is None:
        # No image in this process's batch: keep the projector in the graph with a zero
        # term so data-parallel gradient reduction sees every trainable parameter.
        total = total + sum(p.sum() for p in keepalive) * 0.0
    return StepLosses(total, caption.detach(), global_count, result)


@dataclass
class StepOutcome:
    """What one micro-batch did. ``stepped``: it was the last of an accumulation, so the
    optimizer stepped. ``grad_norm`` (before clipping; None without clipping) stays on the
    device; ``lr_factor`` is the learning rate this step used over the initial one."""

    losses: StepLosses
    stepped: bool
    grad_norm: torch.Tensor | float | None
    lr_factor: float


#: ``explain(losses, what)`` -> the message of a `NonFiniteLossError` (``what``: "loss" or "gradient norm").
Explain = Callable[[StepLosses, str], str]


def _plain_explanation(losses: StepLosses, what: str) -> str:
    return f"non-finite {what} (loss {float(losses.total.detach())}); stopped before the optimizer step"


class TrainStep:
    """Forward, losses, backward and, on the last micro-batch of an accumulation, gradient
    clipping, the optimizer and scheduler steps and the ReGap alpha warm-up.

    With an ``accelerator`` the step runs inside `accelerator.accumulate` and backward,
    clipping and the sync decision are Accelerate's; without one (a single process, no
    accumulation) every call steps, and ``autocast`` (a context-manager factory) may wrap
    the forward. A non-finite loss stops before backward; a non-finite gradient norm stops
    before the optimizer step (unless ``stop_on_bad_grad_norm`` is off: fp16's loss scaler
    skips such steps by itself).
    """

    def __init__(self, module: nn.Module, optimizer: Any, scheduler: Any = None, *, accelerator: Any = None,
                 regap: ReGapLoss | None = None, capture: HiddenCapture | None = None,
                 keepalive: list[nn.Parameter] | None = None, max_grad_norm: float = 0.0,
                 stop_on_bad_grad_norm: bool = True, autocast: Callable[[], Any] | None = None) -> None:
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.accelerator, self.regap, self.capture, self.keepalive = accelerator, regap, capture, keepalive
        self.max_grad_norm, self.stop_on_bad_grad_norm = max_grad_norm, stop_on_bad_grad_norm
        self.autocast = autocast

    def __call__(self, inputs: ModelInputs, positions: torch.Tensor | None = None,
                 explain: Explain = _plain_explanation) -> StepOutcome:
        accelerator = self.accelerator
        with accelerator.accumulate(self.module) if accelerator is not None else contextlib.nullcontext():
            with self.autocast() if self.autocast is not None else contextlib.nullcontext():
                losses = compute_losses(self.module, inputs, self.regap, self.capture, self.keepalive, positions)
            if not bool(torch.isfinite(losses.total.detach())):
                raise NonFiniteLossError(explain(losses, "loss"))
            if accelerator is not None:
                accelerator.backward(losses.total)
            else:
                losses.total.backward()
            stepped = accelerator.sync_gradients if accelerator is not None else True
            grad_norm = None
            if stepped and self.max_grad_norm > 0:
                clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
                grad_norm = clip(self.module.parameters(), self.max_grad_norm)
                if grad_norm is not None and self.stop_on_bad_grad_norm and not math.isfinite(float(grad_norm)):
                    raise NonFiniteLossError(explain(losses, "gradient norm"))
            group = self.optimizer.param_groups[0]
            lr_factor = group["lr"] / group.get("initial_lr", group["lr"] or 1.0)  # used by this step
            self.optimizer.step()
            if stepped and self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.capture is not None:
            self.capture.clear()
        if stepped and self.regap is not None:
            self.regap.step()
        return StepOutcome(losses, stepped, grad_norm, lr_factor)


class LossWindow:
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
