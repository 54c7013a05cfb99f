"""Watching a training run: progress bar, ``metrics.jsonl``, trackers, the gap on a probe set.

* :class:`MetricsLog` appends one JSON object per line to ``OUT/metrics.jsonl`` (main
  process only) and forwards numeric values to accelerate's trackers (TensorBoard,
  W&B) when they are installed and asked for.
* :class:`Progress` is a tqdm bar with loss, gap, samples/s and ETA.
* :func:`probe_gaps` measures, on a fixed probe set, the layer-0 gap (centroid distance
  at the LLM input, scaled by the probe's own text-centric alpha, so runs with and
  without ReGap are comparable) and MIR over decoder layers 1..L
  (``regap.gap.mir`` on ``output_hidden_states``: image tokens at ``image_mask``
  positions, text tokens at ``ModelInputs.text_mask(text_tokens)``, the rule of
  ``regap gap``'s collector; the mode is written next to the numbers as
  ``probe_text_tokens``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from regap.errors import RegapError


def available_trackers(requested: Sequence[str]) -> list[str]:
    """The requested trackers that are installed (a warning names the missing ones)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    checks = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    out = []
    for name in requested:
        if checks[name]():
            out.append(name)
        else:
            warnings.warn(f"tracker {name!r} is not installed (pip install {name}); logging to metrics.jsonl only",
                          stacklevel=2)
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLog:
    """Append-only JSONL metrics (main process), mirrored to accelerate trackers."""

    def __init__(self, path: Path, accelerator: Any = None, *, enabled: bool = True) -> None:
        self.path = path
        self.accelerator = accelerator
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint's step (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row.get("step"), int) or row["step"] <= step:
                kept.append(line)
        from regap.files import write_text_atomic

        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.accelerator is not None and self.accelerator.trackers and isinstance(row.get("step"), int):
            numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k != "step"}
            self.accelerator.log(numeric, step=row["step"])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def training_seconds(rows: Sequence[dict[str, Any]]) -> float:
    """How long a run's steps took, over all its sittings.

    Why not the wall time of the call that finished it: a stage interrupted and resumed (a long
    study unit spans sittings) would count only its last sitting. ``elapsed_s`` restarts at each
    resume (its first row says ``sitting_start``) and the rows past the checkpoint are dropped
    there, so summing its increments, sitting by sitting, counts every kept step once. Files
    written before that flag existed are split where ``elapsed_s`` drops. Loading the model at
    each start is not counted."""
    total, previous = 0.0, 0.0
    for row in rows:
        elapsed = row.get("elapsed_s")
        if not isinstance(elapsed, (int, float)):
            continue
        new_sitting = row.get("sitting_start") or elapsed < previous
        total += elapsed if new_sitting else elapsed - previous
        previous = elapsed
    return round(total, 1)


class Progress:
    """A tqdm bar over optimizer steps (disabled off the main process or on request)."""

    def __init__(self, total: int, initial: int, *, enabled: bool, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                        dynamic_ncols=True, smoothing=0.1)
        self.postfix: dict[str, str] = {}

    def update(self, row: dict[str, Any]) -> None:
        """One step done; shows the row's values, keeping earlier ones that the row lacks
        (steps that are not logged carry no losses: reading them would wait for the device)."""
        for key, label, fmt in (("loss", "loss", "{:.4f}"), ("gap", "gap", "{:.4f}"),
                                ("samples_per_s", "samples/s", "{:.2f}"), ("probe_gap0", "gap0", "{:.4f}")):
            value = row.get(key)
            if isinstance(value, (int, float)):
                self.postfix[label] = fmt.format(value)
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        if not self.bar.disable:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def probe_features(module: Any, batches: Sequence[Any], device: torch.device, *, all_layers: bool,
                   autocast: Any = None, text_tokens: str = "all-non-image",
                   ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Image and text tokens per layer (index 0 = LLM input) over the probe batches, on the CPU.

    ``module(inputs, output_hidden_states=True)`` must return an object with
    ``hidden_states``. With ``all_layers=False`` only layer 0 is kept. Text tokens are
    ``inputs.text_mask(text_tokens)``.
    """
    import contextlib
    import inspect

    was_training = module.training
    module.eval()
    # Only the hidden states are needed: project a single position onto the vocabulary.
    extra = ({"logits_positions": torch.tensor([0])}
             if "logits_positions" in inspect.signature(module.forward).parameters else {})
    images: list[list[torch.Tensor]] = []
    texts: list[list[torch.Tensor]] = []
    try:
        for inputs in batches:
            inputs = inputs.to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                if not all_layers and hasattr(module, "lvlm"):
                    hidden = (module.lvlm.embed(inputs),)  # layer 0 needs no LLM pass
                else:
                    hidden = module(inputs, output_hidden_states=True, **extra).hidden_states
            img_sel = inputs.image_mask.bool() & inputs.attention_mask.bool()
            txt_sel = inputs.text_mask(text_tokens)
            if not images:
                images = [[] for _ in hidden]
                texts = [[] for _ in hidden]
            for k, h in enumerate(hidden):
                images[k].append(h[img_sel].float().cpu())
                texts[k].append(h[txt_sel].float().cpu())
    finally:
        module.train(was_training)
    return images, texts


def probe_gaps(module: Any, batches: Sequence[Any], device: torch.device, *, with_mir: bool,
               autocast: Any = None, text_tokens: str = "all-non-image") -> dict[str, Any]:
    """``probe_gap0`` (layer-0 centroid gap, probe alpha), ``probe_norm_ratio0`` and, with
    ``with_mir``, ``probe_mir`` (MIR over layers 1..L, exact Fréchet), all with text tokens
    under ``text_tokens`` mode, which ``probe_text_tokens`` names next to them."""
    from regap.gap import centroid_gap, mir, text_centric_scale

    images, texts = probe_features(module, batches, device, all_layers=with_mir, autocast=autocast,
                                   text_tokens=text_tokens)
    out: dict[str, Any] = {}
    img0, txt0 = torch.cat(images[0]), torch.cat(texts[0])
    if img0.shape[0] == 0 or txt0.shape[0] == 0:
        return out
    alpha = text_centric_scale(txt0)
    out["probe_gap0"] = float(centroid_gap(img0, txt0, alpha=alpha))
    out["probe_norm_ratio0"] = float(img0.norm(dim=-1).mean() / txt0.norm(dim=-1).mean())
    if with_mir and len(images) > 1:
        try:
            result = mir([torch.cat(layer) for layer in images[1:]], [torch.cat(layer) for layer in texts[1:]])
            out["probe_mir"] = result.mir
        except RegapError as exc:
            warnings.warn(f"MIR on the probe set failed: {exc}", stacklevel=2)
    out["probe_text_tokens"] = text_tokens
    return out
