"""Calibration files of the hidden-state defenses (CMRM shift vectors, layer-0 affine maps).

A calibration file is a safetensors file whose header metadata holds a JSON record (key
``regap``): the defense it belongs to, the model's fingerprint, hidden size and layer count,
and the calibration data and seed, plus library versions. A JSON sidecar (same name, suffix
``.json``) repeats the record with the file's sha256, for people. Loading checks the record
against the model, so vectors computed on one model are never applied to another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from regap.defenses.base import Defense, PairMaker
from regap.errors import RegapError
from regap.files import atomic_path, file_sha256, write_json_atomic
from regap.models.attention import llm_attention
from regap.provenance import json_hash, provenance

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

FORMAT_VERSION = 1
METADATA_KEY = "regap"


@dataclass
class CalibrationFile:
    """Tensors and the record of one calibration file; `sha256` is the file's full hash."""

    path: Path
    kind: str
    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]
    sha256: str


def model_facts(model: LVLM) -> dict[str, Any]:
    """What a calibration file must match: fingerprint, hidden size, decoder layers."""
    from regap.models.fingerprint import model_fingerprint

    return {"model_fingerprint": model_fingerprint(model), "hidden_size": int(model.hidden_size),
            "num_layers": int(model.llm.config.num_hidden_layers)}


def save_calibration(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], model: LVLM,
                     calibration: dict[str, Any], model_name: str | None = None) -> CalibrationFile:
    """Write tensors + record atomically (a temporary file renamed into place), then the sidecar."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise RegapError(f"calibration file {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = model_facts(model)
    record = provenance(kind=kind, format=FORMAT_VERSION, model=model_name or model.config.name,
                        dtype=str(model.dtype).removeprefix("torch."), attn_implementation=llm_attention(model), **facts, calibration=calibration,
                        tensors={k: list(v.shape) for k, v in tensors.items()})
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={METADATA_KEY: json.dumps(record, sort_keys=True, default=str)})
    sha = file_sha256(path)
    write_json_atomic(path.with_suffix(".json"), {**record, "file": path.name, "file_sha256": sha})
    return CalibrationFile(path, kind, dict(tensors), record, sha)


def read_calibration(path: str | Path) -> CalibrationFile:
    """Read a calibration file without checking it against a model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise RegapError(f"calibration file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise RegapError(f"calibration file {path} is not a readable safetensors file: {exc}") from None
    try:
        record = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise RegapError(f"calibration file {path} has no regap record (make it with `regap defense calibrate`)") from None
    if not isinstance(record, dict) or "kind" not in record:
        raise RegapError(f"calibration file {path}: the regap record has no 'kind'")
    return CalibrationFile(path, str(record["kind"]), tensors, record, file_sha256(path))


def load_calibration(path: str | Path, kind: str, model: LVLM, shapes: dict[str, tuple[int | str, ...]]) -> CalibrationFile:
    """Read a calibration file and check it belongs to `kind` and to this model.

    `shapes` gives each required tensor's shape; "d" stands for the hidden size and "L" for
    the number of decoder layers.
    """
    loaded = read_calibration(path)
    record = loaded.record
    if loaded.kind != kind:
        raise RegapError(f"calibration file {loaded.path} is for {loaded.kind!r}, not {kind!r}")
    if int(record.get("format", -1)) != FORMAT_VERSION:
        raise RegapError(f"calibration file {loaded.path} has format {record.get('format')}, expected {FORMAT_VERSION}")
    facts = model_facts(model)
    if record.get("hidden_size") != facts["hidden_size"]:
        raise RegapError(f"calibration file {loaded.path} was made for hidden size {record.get('hidden_size')}, "
                         f"this model has {facts['hidden_size']}")
    if record.get("num_layers") != facts["num_layers"]:
        raise RegapError(f"calibration file {loaded.path} was made for {record.get('num_layers')} decoder layers, "
                         f"this model has {facts['num_layers']}")
    kernel, recorded_kernel = llm_attention(model), record.get("attn_implementation", "sdpa")
    if record.get("model_fingerprint") != facts["model_fingerprint"] and recorded_kernel != kernel:
        raise RegapError(f"calibration file {loaded.path} was made with the LLM's attention kernel {recorded_kernel!r}; "
                         f"this model runs {kernel!r}: pass --attn-implementation {recorded_kernel} or calibrate again")
    if record.get("model_fingerprint") != facts["model_fingerprint"]:
        raise RegapError(f"calibration file {loaded.path} was made for model fingerprint "
                         f"{record.get('model_fingerprint')} ({record.get('model')}), this model's is "
                         f"{facts['model_fingerprint']}: calibrate again for this model (same --dtype, --projector and --attn-implementation)")
    sizes = {"d": facts["hidden_size"], "L": facts["num_layers"]}
    for name, shape in shapes.items():
        tensor = loaded.tensors.get(name)
        if tensor is None:
            raise RegapError(f"calibration file {loaded.path} has no tensor {name!r}")
        expected = tuple(sizes.get(dim, dim) for dim in shape)
        if tuple(tensor.shape) != expected:
            raise RegapError(f"calibration file {loaded.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {expected}")
        if not bool(torch.isfinite(tensor).all()):
            raise RegapError(f"calibration file {loaded.path}: tensor {name!r} has non-finite values")
    return loaded


def auto_path(workdir: Path | None, kind: str, fingerprint: str, calibration: dict[str, Any]) -> Path:
    """Where a calibration made on first use goes: `WORKDIR/defenses/` (else the regap cache),
    named by the defense, the model fingerprint and the calibration settings, so it is reused
    only for the same model and settings."""
    from regap.cache import cache_dir

    folder = Path(workdir) / "defenses" if workdir is not None else cache_dir("defenses")
    return folder / f"{kind}-{fingerprint}-{json_hash(calibration)}.safetensors"


class CalibratedDefense(Defense):
    """A defense that needs a calibration file per model: given (`file=`) or made on first use.

    State is kept per model fingerprint, so one instance serves several models (a safety run's
    model and the LLM before stage 2 of its `backbone` condition) without mixing their files.
    `prepare(model, workdir, make_pairs)` with a run folder loads or computes the file at once (a
    wrong file fails before any generation); without one the file is loaded when first needed.
    A file is computed on `calibration_settings()`'s pairs, built by the `make_pairs` the caller
    gave (kept for later models, e.g. the backbone's).
    """

    kind = "calibrated"
    #: shapes of the required tensors ("d": hidden size, "L": decoder layers), see `load_calibration`
    shapes: dict[str, tuple[int | str, ...]] = {}

    def __init__(self, file: Any = None) -> None:
        self.file = Path(file) if file else None
        self.calibration: CalibrationFile | None = None  # the last one used (provenance)
        self._workdirs: dict[str, Path | None] = {}
        self._calibrations: dict[str, CalibrationFile] = {}
        self._make_pairs: PairMaker | None = None

    def needs_calibration(self) -> bool:
        return True

    def calibration_settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def compute_calibration(self, model: LVLM, pairs: list[Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and the record of a calibration on `pairs`."""
        raise NotImplementedError

    def calibration_pairs(self) -> list[Any]:
        """The pairs `calibration_settings()` names, from the `make_pairs` given to `prepare`."""
        if self._make_pairs is None:
            raise RegapError(f"defense {self.kind} has no calibration file and nothing to build calibration pairs "
                             "with: pass file=PATH (regap defense calibrate), or make_pairs to prepare/build_generate")
        settings = self.calibration_settings()
        return self._make_pairs(settings["pairs"], images=settings["images"], texts=settings["texts"],
                                seed=settings["seed"])

    def validate(self, model: LVLM) -> None:
        """Check the options against the model (cheap; no calibration)."""

    def file_settings(self) -> dict[str, Any]:
        """The file and its sha256, or the settings of a calibration made on first use."""
        if self.file is not None:
            from regap.defenses.base import cached_file_sha256

            return {"file": str(self.file), "file_sha256": cached_file_sha256(self.file)}
        return {"calibration": self.calibration_settings()}

    def prepare(self, model: LVLM, workdir: Path | None = None, make_pairs: PairMaker | None = None) -> None:
        from regap.models.fingerprint import model_fingerprint

        self.validate(model)
        if make_pairs is not None:
            self._make_pairs = make_pairs
        fingerprint = model_fingerprint(model)
        if workdir is not None or fingerprint not in self._workdirs:  # a run folder is never replaced by None
            self._workdirs[fingerprint] = Path(workdir) if workdir is not None else None
        if workdir is not None and self.needs_calibration():
            self.calibration_for(model, fingerprint)

    def calibration_for(self, model: LVLM, fingerprint: str | None = None) -> CalibrationFile:
        """This model's calibration: loaded (checked) from `file`, or made once and reused."""
        if fingerprint is None:
            from regap.models.fingerprint import model_fingerprint

            fingerprint = model_fingerprint(model)
        if fingerprint not in self._calibrations:
            path = self.file or auto_path(self._workdirs.get(fingerprint), self.kind, fingerprint,
                                          self.calibration_settings())
            if self.file is None and not path.is_file():
                tensors, record = self.compute_calibration(model, self.calibration_pairs())
                save_calibration(path, self.kind, tensors, model, record)
            self._calibrations[fingerprint] = load_calibration(path, self.kind, model, self.shapes)
        self.calibration = self._calibrations[fingerprint]
        return self.calibration
