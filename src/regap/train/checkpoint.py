"""Training checkpoints: atomic folders that let `--resume` continue exactly.

A checkpoint ``OUT/checkpoints/step-0000123/`` holds

* ``state.json`` - step, epoch, position in the epoch's sample order, batch layout, the
  training data's sha256 (a resume on changed data is refused);
* ``trainable.safetensors`` - every trainable parameter (projector, MoCa, LoRA or LLM);
* ``projector.safetensors`` (the `save_projector` format), ``moca.safetensors`` and, for
  LoRA, ``adapter/`` (peft's format);
* ``regap_state.safetensors`` - the ReGap alpha warm-up buffers (alpha stays frozen);
* ``optimizer.pt``, ``scheduler.pt``, ``rng_state_<rank>.pt`` (python, numpy, torch, cuda), which hold
  only tensors and plain values and are read with ``torch.load(weights_only=True)`` (`load_plain`):
  a checkpoint folder may come from someone else, and resuming must never run code planted in it;
* with DeepSpeed or FSDP, ``accelerate/`` from `Accelerator.save_state` (sharded states).

The folder is written as ``step-0000123.tmp`` and renamed with ``os.replace`` once
complete, and ``latest.json`` is replaced atomically after that, so an interrupted
save never damages the previous checkpoint. `save_checkpoint` writes one (every process
takes part: sharded states are gathered collectively), `load_checkpoint` restores a run
from one; the helpers below them are the file-level pieces.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from regap import files
from regap.errors import RegapError
from regap.models.moca import MOCA_FILE, save_moca
from regap.train.distributed import is_deepspeed, is_sharded
from regap.train.module import trainable_parameters

if TYPE_CHECKING:
    from regap.train.regap_loss import ReGapLoss

FORMAT = "regap-train-checkpoint/1"
LATEST = "latest.json"
REGAP_STATE_FILE = "regap_state.safetensors"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON with a trailing newline (checkpoint state files have always ended with one)."""
    files.write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with files.atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def torch_save_atomic(obj: Any, path: Path) -> None:
    with files.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_plain(path: Path, map_location: str = "cpu") -> Any:
    """Read a ``.pt`` file that may hold only tensors and plain values (dicts, lists, numbers, strings).

    ``weights_only=True`` refuses every pickled global outside torch's allow-list, so a payload planted
    in a checkpoint cannot run. The numpy array types are allowed too: checkpoints written before the
    RNG state was stored as a tensor hold numpy's generator state as an ndarray.
    """
    if not path.is_file():
        raise RegapError(f"checkpoint file missing: {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RegapError(f"refusing to load {path}: it holds more than tensors and plain values "
                         f"({_unpickling_reason(exc)}); regap never unpickles objects from a checkpoint") from None
    except Exception as exc:  # truncated zip, wrong format...
        raise RegapError(f"cannot read {path}: {exc}") from None


# Exactly what a uint32 ndarray's pickle names (found through the array itself, which works on numpy 1
# and 2); none of these callables does anything but build an array.
_NUMPY_ARRAY_GLOBALS = [np.zeros(1, np.uint32).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _unpickling_reason(exc: Exception) -> str:
    """What torch's multi-paragraph weights_only message refused (a global's name, or a pickle opcode)."""
    text = str(exc)
    found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if found:
        return f"it names the Python object {found.group(1)}"
    found = re.search(r"Unsupported operand \d+", text)
    return found.group(0) if found else "not a plain tensor file"


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, so that `load_plain` can read it back."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((kind, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")
             and not p.name.endswith(".tmp") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint named by latest.json, else the newest complete one."""
    pointer = folder / LATEST
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
            candidate = folder / name
            if (candidate / "state.json").is_file():
                return candidate
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    found = list_checkpoints(folder)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegapError(f"cannot read checkpoint state {checkpoint / 'state.json'}: {exc}") from None
    if state.get("format") != FORMAT:
        raise RegapError(f"{checkpoint}: not a regap training checkpoint (format {state.get('format')!r})")
    return state


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RegapError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for corrupt files
        raise RegapError(f"cannot read {path}: {exc}") from None


def rotate(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all) and stale .tmp folders."""
    for stale in folder.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- whole checkpoints


def trainable_state(accelerator: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name (gathered from the shards under DeepSpeed / FSDP: a collective)."""
    unwrapped = accelerator.unwrap_model(module)
    names = set(trainable_parameters(unwrapped))
    if is_sharded(accelerator):
        state = accelerator.get_state_dict(module)
        return {k: v for k, v in state.items() if k in names}
    return {k: v.detach() for k, v in unwrapped.named_parameters() if k in names}


def save_adapter(peft_model: Any, folder: Path, trainable: dict[str, torch.Tensor]) -> None:
    """peft `save_pretrained`, from the (possibly gathered) trainable weights."""
    prefix = "lvlm.llm."
    state = {k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix)}
    peft_model.save_pretrained(str(folder), state_dict=state or None)
    files.apply_umask(folder)  # safetensors writes 0600


def save_checkpoint(accelerator: Any, out_dir: Path, step: int, state: dict[str, Any], module: nn.Module,
                    optimizer: Any, scheduler: Any, regap: "ReGapLoss | None", keep: int) -> Path:
    """Write ``OUT/checkpoints/step-<step>/`` (every process calls this) and rotate old ones."""
    folder = out_dir / "checkpoints"
    final = folder / checkpoint_name(step)
    tmp = folder / (final.name + ".tmp")
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    trainable = trainable_state(accelerator, module)  # collective under ZeRO-3 / FSDP
    if is_sharded(accelerator):
        # DeepSpeed: leave the frozen backbone out of every checkpoint (it is rebuilt from its source).
        kwargs = {"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}
        accelerator.save_state(str(tmp / "accelerate"), **kwargs)
    torch_save_atomic(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(module)
        save_tensors_atomic(trainable, tmp / "trainable.safetensors")
        from regap.models import save_projector

        save_projector(unwrapped.lvlm, tmp / "projector.safetensors", metadata={"step": str(step)})
        if unwrapped.moca is not None:
            save_moca(unwrapped.moca, tmp / MOCA_FILE)
        if regap is not None:
            save_tensors_atomic(dict(regap.state_dict()), tmp / REGAP_STATE_FILE)
        if hasattr(unwrapped.lvlm.llm, "peft_config"):  # LoRA: the adapter in peft's own format too
            save_adapter(unwrapped.lvlm.llm, tmp / "adapter", trainable)
        if not is_sharded(accelerator):
            torch_save_atomic(optimizer.state_dict(), tmp / "optimizer.pt")
        torch_save_atomic(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json_atomic(tmp / "state.json", {"format": FORMAT, **state})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json_atomic(folder / LATEST, {"checkpoint": final.name, "step": step})
        rotate(folder, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: Path, module: nn.Module, optimizer: Any, scheduler: Any,
                    regap: "ReGapLoss | None") -> dict[str, Any]:
    """Restore the trainable weights, optimizer, scheduler, ReGap and RNG states; returns state.json."""
    state = read_state(checkpoint)
    unwrapped = accelerator.unwrap_model(module)
    if is_sharded(accelerator):
        kwargs = {"load_module_strict": False} if is_deepspeed(accelerator) else {}
        accelerator.load_state(str(checkpoint / "accelerate"), **kwargs)
    else:
        tensors = load_tensors(checkpoint / "trainable.safetensors")
        expected = trainable_parameters(unwrapped)
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise RegapError(f"{checkpoint}: trainable parameters do not match this run "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for name, parameter in expected.items():
                parameter.copy_(tensors[name].to(parameter.dtype))
        # Loaded on the CPU; Optimizer.load_state_dict moves the states to their parameters' devices.
        optimizer.load_state_dict(load_plain(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(load_plain(checkpoint / "scheduler.pt"))
    if regap is not None:
        path = checkpoint / REGAP_STATE_FILE
        if path.is_file():
            regap.load_state_dict({k: v.to(accelerator.device) for k, v in load_tensors(path).items()}, strict=False)
    rng_file = checkpoint / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(load_plain(rng_file))
    else:
        warnings.warn(f"{checkpoint} has no RNG state for process {accelerator.process_index} "
                      "(different number of processes?): dropout noise will differ from an uninterrupted run",
                      stacklevel=2)
    return state


def check_resume_data(checkpoint: Path, json_path: Path, data_sha: str) -> None:
    """Refuse to resume on other training data: the sample order and every step so far
    assume the rows the checkpoint was trained on (same path, other rows is silent otherwise)."""
    stored = read_state(checkpoint).get("data_sha256")
    if stored is None:  # checkpoints written before the hash was stored
        warnings.warn(f"{checkpoint} does not record its training data's sha256; cannot check that {json_path} "
                      "is unchanged", stacklevel=3)
    elif stored != data_sha:
        raise RegapError(f"cannot resume {checkpoint.parent.parent}: the training data {json_path} changed since the "
                         f"checkpoint (sha256 {data_sha[:12]}..., checkpoint has {stored[:12]}...); restore the data "
                         "or start a new run with another --out")


def projector_sha256(source: str | None) -> str | None:
    """The content of a run's initial projector (`projector:`, a file or a training output folder):
    its sha256, so a resume can find the same weights under another path."""
    if not source:
        return None
    path = Path(source)
    path = path / "projector.safetensors" if path.is_dir() else path
    return files.file_sha256(path) if path.is_file() else None


def check_resume_projector(checkpoint: Path, projector_sha: str | None) -> None:
    """Refuse to resume from other initial projector weights than the checkpoint's run started from
    (the path may differ: a moved or copied run folder keeps its content)."""
    stored = read_state(checkpoint).get("projector_sha256")
    if stored is not None and projector_sha is not None and stored != projector_sha:
        raise RegapError(f"cannot resume {checkpoint.parent.parent}: the initial projector changed since the "
                         f"checkpoint (sha256 {projector_sha[:12]}..., checkpoint has {stored[:12]}...); point "
                         "`projector` at the weights the run started from, or start a new run with another --out")
