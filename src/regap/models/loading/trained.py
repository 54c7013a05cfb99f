"""Trained models: the folders `regap pretrain` / `regap finetune` write, and the trained presets
built the same way.

A training output folder is a model folder format: its `config.yaml` names the base model and how
it was built (seed, projector kind and sizes), and beside it lie the trained parts (projector, the
LoRA adapter or the full LLM of stage 2, MoCa); `OUT/checkpoints/step-N` holds the parts at step N.
`read_training_record` reads what loading needs from `config.yaml` (the rest of the file is the
training's own business, `regap.train.config`); `regap.models.loading.load.load_trained` rebuilds it.

Trained presets: a base preset plus a trained projector and LoRA adapter that ship inside the
package (`regap/assets/presets/<assets>/`), so `--model tiny-llava` needs no training run.

Every asset file is pinned by sha256 in the preset itself (`Preset.pins`, in code, not only in the
folder's manifest), and every pinned file is checked before any of them is read: a changed byte
is refused, never loaded. The folder's `manifest.json` (pinned too) says how the base model is
rebuilt (its seed and projector kind) and what the parts were trained on, with which settings
(`regap models` shows it). `regap models package` (`regap.train.package`) writes such a folder
from a stage-2 LoRA training output and prints the pins to paste into `regap.models.loading.presets`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from regap import config as typed
from regap.errors import RegapError
from regap.files import file_sha256
from regap.models.loading.folders import PROJECTOR_FILE, TRAIN_CONFIG_FILE
from regap.models.loading.saved import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_adapter, load_projector
from regap.models.moca import MOCA_FILE, load_moca
from regap.models.loading.presets import PRESETS, TINY_RANDOM, Preset

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

# ----------------------------------------------------------------------------- training output folders


@dataclass(frozen=True)
class TrainingRecord:
    """What a training output's `config.yaml` says about the model it trained."""

    model: str  # the base: a preset, a folder, an HF LLaVA checkpoint, or `TINY_RANDOM`
    dtype: str  # the frozen parts' dtype the run resolved
    stage: int
    tune: str  # projector | lora | full
    seed: int  # seeds a fresh projector (and `TINY_RANDOM`'s weights)
    projector_type: str | None  # None: the base model's own projector
    projector_options: dict[str, int]  # the sizes of a fresh Q-Former

    def base_options(self) -> dict[str, Any]:
        """`regap.models.loading.load.build_base_model` keywords that rebuild the run's starting model."""
        return {"projector_type": self.projector_type, "projector_options": dict(self.projector_options),
                "seed": self.seed}


def read_training_record(run_dir: Path) -> TrainingRecord:
    """The base model and how it was built, from `run_dir/config.yaml` (typed as the training config is)."""
    path = Path(run_dir) / TRAIN_CONFIG_FILE
    data = typed.read_yaml(path, "training config")
    source = str(path)

    def field(key: str, hint: Any, default: Any) -> Any:
        return typed.coerce(hint, data.get(key, default), key, source=source)

    stage = field("stage", int, 1)
    qformer = data.get("qformer") or {}
    if not isinstance(qformer, dict):
        raise RegapError(f"config key 'qformer' in {source} must be a mapping of keys, got {qformer!r}")
    sizes = {k: typed.coerce(int, v, f"qformer.{k}", source=source)
             for k, v in qformer.items() if k != "trainable" and v is not None}
    return TrainingRecord(
        model=field("model", str, "tiny"), dtype=field("dtype", str, "auto"), stage=stage,
        tune=field("tune", str, "projector" if stage == 1 else "full"), seed=field("seed", int, 42),
        projector_type=field("projector_type", str | None, None), projector_options=sizes,
    )


def load_checkpoint_parts(lvlm: LVLM, checkpoint: Path) -> None:
    """A checkpoint's projector, LoRA adapter (stage 2) and MoCa into `lvlm`, in place (a learning curve
    swaps them into one model instead of rebuilding it per checkpoint)."""
    from safetensors.torch import load_file

    if not (checkpoint / PROJECTOR_FILE).is_file():
        raise RegapError(f"{checkpoint}: no {PROJECTOR_FILE} (not a regap training checkpoint)")
    load_projector(lvlm, checkpoint / PROJECTOR_FILE)
    adapter = checkpoint / ADAPTER_DIR / ADAPTER_WEIGHTS_FILE
    if adapter.is_file():
        if not hasattr(lvlm.llm, "peft_config"):
            raise RegapError(f"{checkpoint}: holds a LoRA adapter, but the model it is loaded into has none")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(lvlm.llm, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RegapError(f"{adapter}: adapter keys not in the model: {unexpected[:3]}")
    if (checkpoint / MOCA_FILE).is_file():
        if lvlm.moca is None:
            lvlm.set_moca(load_moca(checkpoint / MOCA_FILE, lvlm.llm))
        else:
            lvlm.moca.load_state_dict(load_moca(checkpoint / MOCA_FILE, lvlm.llm).state_dict())


def attach_training_output(lvlm: LVLM, out_dir: Path) -> LVLM:
    """A finished output's projector and LoRA adapter into its rebuilt base `lvlm`, in place."""
    load_projector(lvlm, out_dir / PROJECTOR_FILE)
    if (out_dir / ADAPTER_DIR).is_dir():
        load_adapter(lvlm, out_dir / ADAPTER_DIR)
    return lvlm


def attach_training_moca(lvlm: LVLM, out_dir: Path) -> LVLM:
    """The output's MoCa, unless the model has one already (a full stage 2's `model/` holds it)."""
    if lvlm.moca is None and (out_dir / MOCA_FILE).is_file():
        lvlm.set_moca(load_moca(out_dir / MOCA_FILE, lvlm.llm))
    return lvlm.eval()


# ----------------------------------------------------------------------------- trained presets


#: Where the packaged assets live (one folder per trained preset; package data, see pyproject.toml).
ASSETS_ROOT = Path(str(resources.files("regap") / "assets" / "presets"))
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "regap-trained-preset/1"
ADAPTER_DIR = "adapter"
#: The files every trained preset has (a MoCa, `moca.safetensors`, is optional).
REQUIRED_FILES = (MANIFEST_FILE, PROJECTOR_FILE, f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}",
                  f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS_FILE}")

# States of a trained preset's assets (`inspect_assets`).
VERIFIED = "verified"
NOT_PACKAGED = "not packaged"
MISSING = "missing"
MODIFIED = "modified"
INVALID = "invalid"


@dataclass
class AssetsReport:
    """What `inspect_assets` found: the state, a one-line detail that names the preset and the
    file, and the manifest (read even when the files are not verified, for display only)."""

    preset: str
    state: str
    detail: str
    folder: Path | None = None
    manifest: dict[str, Any] | None = None

    @property
    def verified(self) -> bool:
        return self.state == VERIFIED

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "present": self.state not in (NOT_PACKAGED, MISSING),
                "verified": self.verified, "detail": self.detail,
                "folder": str(self.folder) if self.folder is not None else None}


def assets_dir(preset: Preset) -> Path:
    return ASSETS_ROOT / (preset.assets or preset.name)


def pinned_path(folder: Path, relative: str, preset: str) -> Path:
    """`folder / relative` for a pin's relative POSIX path, which must stay inside `folder`."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or any(p in ("..", ".", "") for p in parts) or "\\" in relative:
        raise RegapError(f"preset {preset}: pinned path {relative!r} must be a relative path inside its asset folder")
    return folder.joinpath(*parts)


def inspect_assets(preset: Preset) -> AssetsReport:
    """Check a trained preset's assets without raising: pins present, every pinned file there with
    its pinned sha256, and a manifest that matches the preset."""
    name = preset.name
    if not preset.trained:
        raise RegapError(f"preset {name} is not a trained preset (it has no base)")
    folder = assets_dir(preset)
    if not preset.pins:
        return AssetsReport(name, NOT_PACKAGED, f"preset {name}: assets not packaged yet (no sha256 pins in "
                            f"regap.models.loading.presets; `regap models package` writes the files and prints the pins)", folder)
    unpinned = [f for f in REQUIRED_FILES if f not in preset.pins]
    if unpinned:
        return AssetsReport(name, INVALID, f"preset {name}: no sha256 pin for {', '.join(unpinned)}", folder)
    manifest = _read_manifest_quietly(folder / MANIFEST_FILE)
    for relative, expected in sorted(preset.pins.items()):
        try:
            path = pinned_path(folder, relative, name)
        except RegapError as exc:
            return AssetsReport(name, INVALID, str(exc), folder, manifest)
        if not path.is_file():
            return AssetsReport(name, MISSING, f"preset {name}: asset {path} is missing (the package was installed "
                                f"without its assets, or they were never copied there)", folder, manifest)
        actual = file_sha256(path)
        if actual != expected:
            return AssetsReport(name, MODIFIED, f"preset {name}: asset {path} has sha256 {actual}, expected "
                                f"{expected} (the file changed after it was pinned)", folder, manifest)
    problem = _manifest_problem(preset, manifest)
    if problem:
        return AssetsReport(name, INVALID, f"preset {name}: {folder / MANIFEST_FILE}: {problem}", folder, manifest)
    return AssetsReport(name, VERIFIED, f"all {len(preset.pins)} pinned files verified", folder, manifest)


def verify_assets(preset: Preset) -> AssetsReport:
    """`inspect_assets`, raising its one-line RegapError unless every pinned file is verified."""
    report = inspect_assets(preset)
    if not report.verified:
        raise RegapError(report.detail)
    return report


def _read_manifest_quietly(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest_problem(preset: Preset, manifest: dict[str, Any] | None) -> str | None:
    """Why a (verified) manifest does not fit the preset; None when it does."""
    if manifest is None:
        return "not a JSON object"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"field 'format' is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
    if manifest.get("name") != preset.name:
        return f"field 'name' is {manifest.get('name')!r}: these assets were packaged for another preset"
    base = manifest.get("base")
    if not isinstance(base, dict) or base.get("model") != preset.base:
        model = base.get("model") if isinstance(base, dict) else None
        return f"field 'base.model' is {model!r}, but the preset's base is {preset.base!r}"
    if not is_base_model(preset.base):
        return f"base {preset.base!r} is not a preset built from parts (or {TINY_RANDOM})"
    files = manifest.get("files")
    if not isinstance(files, dict) or any(preset.pins.get(k) != v for k, v in files.items()):
        return "field 'files' does not match the preset's pins"
    return None


def is_base_model(name: str | None) -> bool:
    """Whether a trained preset can be built on `name`: a preset built from parts, or `TINY_RANDOM`."""
    if name == TINY_RANDOM:
        return True
    preset = PRESETS.get(name or "")
    return preset is not None and preset.config is not None and not preset.trained


def base_options(report: AssetsReport) -> dict[str, Any]:
    """`regap.models.loading.load.build_base_model` keywords for the verified manifest's base."""
    assert report.manifest is not None
    base = report.manifest["base"]
    return {"projector_type": base.get("projector_type"), "projector_options": base.get("projector_options") or {},
            "seed": int(base.get("seed", 0))}


def attach_assets(model: LVLM, preset: Preset, report: AssetsReport) -> LVLM:
    """Load the verified projector, LoRA adapter (and MoCa) into the base `model`, and name it
    after the preset (`config.name`, which provenance records, and the asset pins in `extra`)."""
    assert report.verified and report.folder is not None
    folder = report.folder
    load_projector(model, folder / PROJECTOR_FILE)
    load_adapter(model, folder / ADAPTER_DIR)
    if MOCA_FILE in preset.pins:
        model.set_moca(load_moca(folder / MOCA_FILE, model.llm))
    extra = {**model.config.extra, "trained_preset": {"base": preset.base, "manifest_sha256": preset.pins[MANIFEST_FILE]}}
    model.config = dataclasses.replace(model.config, name=preset.name, extra=extra)
    return model.eval()


# ----------------------------------------------------------------------------- display


def describe_training(manifest: dict[str, Any] | None) -> str:
    """One line for `regap models`: what the parts were trained on and with which settings."""
    if not manifest:
        return "-"
    training = manifest.get("training") or {}
    parts = []
    stage1 = training.get("stage1")
    if isinstance(stage1, dict):
        parts.append(f"stage 1: {_one_stage(stage1)}")
    parts.append(f"stage 2: {_one_stage(training)}")
    info = manifest.get("info") or {}
    if info:
        parts.append("; ".join(f"{k}={v}" for k, v in info.items()))
    return "; ".join(parts)


def _one_stage(settings: dict[str, Any]) -> str:
    data = settings.get("data") or {}
    words = [str(settings.get("tune", "?"))]
    lora = settings.get("lora")
    if settings.get("tune") == "lora" and isinstance(lora, dict):
        words[0] += f" r={lora.get('r')}"
    if settings.get("steps") is not None:
        words.append(f"{settings['steps']} steps")
    if settings.get("lr") is not None:
        words.append(f"lr {settings['lr']:g}")
    if data.get("json"):
        loaded = f", {data['loaded']} items" if data.get("loaded") is not None else ""
        words.append(f"on {data['json']}{loaded}")
    regap = settings.get("regap") or {}
    words.append(f"ReGap lambda {regap.get('lam', 0)}")
    return ", ".join(words)
