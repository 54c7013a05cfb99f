"""The training configuration: typed, loaded from YAML, changed with `key=value` overrides.

Every key is checked before any work starts: an unknown key (in the file or in an
override) fails with a one-line error that names it, and a value of the wrong type or
outside its choices fails naming the key and the allowed values. Reading and type rules are
`regap.config`'s, shared with the study's config.

Stage-dependent defaults (learning rate, global batch, template) are left as ``None``
in the dataclasses and filled by :meth:`TrainConfig.resolved`, so the ``config.yaml``
written into the output folder shows the numbers that were actually used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from regap import config as typed
from regap.errors import RegapError
from regap.models.attention import check_attention

DISTANCES = ("centroid", "centroid+norm", "frechet", "cosine")
POOLINGS = ("batch", "sample")
TEXT_STATS = ("auto", "corpus", "batch")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TUNE = {1: ("projector",), 2: ("full", "lora", "projector")}
TRACKERS = ("tensorboard", "wandb")
QFORMER_TRAINABLE = ("all", "linear")

#: LLaVA-1.5 defaults (see docs/training.md).
LLAVA15 = {
    1: {"global_batch_size": 256, "lr": 1e-3, "template": "plain", "tune": "projector"},
    2: {"global_batch_size": 128, "lr": 2e-5, "template": None, "tune": "full"},
}
LORA_LR = 2e-4
LORA_PROJECTOR_LR = 2e-5


@dataclass
class SynthSpec:
    """Generate synthetic data (`regap data synth`) into OUT/data when `data.json` is missing."""

    n: int = 256
    seed: int = 0
    image_size: int = 224


@dataclass
class DataSpec:
    json: str = ""  # LLaVA JSON / JSONL file (captions for stage 1, conversations for stage 2)
    image_root: str | None = None  # default: the JSON file's folder
    max_items: int | None = None
    synth: SynthSpec | None = None
    num_workers: int = 0  # DataLoader worker processes (image decoding)
    feature_cache: str = "auto"  # frozen vision features cached on disk: auto (on for CPU runs) | on | off


@dataclass
class RegapSpec:
    """The ReGap regulariser (off when `lam` is 0)."""

    lam: float = 0.0
    layer: int = 0  # 0 = LLM input embeddings; k = output of decoder block k
    distance: str = "centroid"  # centroid | centroid+norm | frechet | cosine
    pooling: str = "batch"  # batch | sample
    warmup_steps: int = 10  # optimizer steps over which alpha is averaged, then frozen
    norm_weight: float = 1.0  # weight of the mean-norm term of `centroid+norm`
    ridge: float = 0.0  # added to covariance diagonals (frechet)
    detach_text: bool = True  # the text side is the target: no gradient through it
    text_stats: str = "auto"  # frechet: corpus (cached) | batch | auto (corpus at layer 0 with a frozen LLM)
    text_tokens: str = "all-non-image"  # the text side: all-non-image | after-image (ModelInputs.text_mask)


@dataclass
class QFormerSpec:
    """A Q-Former connector: which parts train, and the size of a fresh one (`projector_type: qformer`)."""

    trainable: str | None = None  # all (queries + Q-Former + linear) | linear (MiniGPT-4) | null: the projector's own
    num_query_tokens: int | None = None  # sizes: null = regap.models.qformer.DEFAULTS
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    cross_attention_frequency: int | None = None

    def options(self) -> dict[str, int]:
        """The sizes that were set, as `build_projector("qformer", ...)` options."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "trainable" and v is not None}


@dataclass
class MocaSpec:
    """MoCa baseline: per-dimension scale and shift of vision tokens after decoder layers."""

    enabled: bool = False
    layers: list[int] | None = None  # decoder blocks (1-based); default: all


@dataclass
class LoraSpec:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | None = None  # default: every linear layer of the LLM but the head


@dataclass
class ObserveSpec:
    progress: bool = True  # progress bar (main process)
    log_every: int = 1  # optimizer steps between metrics.jsonl rows
    gap_every: int = 50  # steps between layer-0 gap measurements on the probe set (0 = off)
    mir_every: int = 200  # steps between MIR measurements on the probe set (0 = off)
    probe_size: int = 16  # probe image-caption pairs (the first items of the data, evenly spaced)
    text_tokens: str = "all-non-image"  # the probe's text tokens: all-non-image | after-image (as `regap gap`)
    trackers: list[str] = field(default_factory=list)  # tensorboard / wandb, when installed
    project: str = "regap"


@dataclass
class TrainConfig:
    stage: int = 1
    model: str = "tiny"  # preset name, saved folder, HF LLaVA checkpoint, or `tiny-random`
    dtype: str = "auto"  # weights of the frozen parts; auto: bfloat16 where the device computes it fast
    mixed_precision: str = "auto"  # auto (follows dtype) | no | bf16 | fp16 (autocast; trainable weights stay float32)
    cpu: bool = False  # force CPU even when a GPU is present
    attn_implementation: str | None = None  # the LLM's attention: null (library default, sdpa) | eager | flash_attention_2 | ...
    projector: str | None = None  # initial projector: .safetensors file or a stage-1 output folder
    projector_type: str | None = None  # null: the model's own; linear | mlpNx_gelu | qformer: a fresh one of that kind
    template: str | None = None  # plain (stage 1) | chat | vicuna_v1
    tune: str | None = None  # stage 1: projector; stage 2: full | lora | projector
    data: DataSpec = field(default_factory=DataSpec)
    global_batch_size: int | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    lr: float | None = None
    projector_lr: float | None = None  # default: lr (stage 2 LoRA: 2e-5)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0  # 0 = no clipping
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; default: epochs x steps per epoch
    max_length: int = 2048
    seed: int = 42
    gradient_checkpointing: bool = False
    save_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (0 = keep all)
    stop_after_steps: int | None = None  # stop as if interrupted (schedule unchanged); resume later
    regap: RegapSpec = field(default_factory=RegapSpec)
    qformer: QFormerSpec = field(default_factory=QFormerSpec)
    moca: MocaSpec = field(default_factory=MocaSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    observe: ObserveSpec = field(default_factory=ObserveSpec)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> "TrainConfig":
        """A checked config from a mapping (`source`: the file it came from, for errors)."""
        config = typed.build(cls, data, source=source)
        config.validate()
        return config

    # ------------------------------------------------------------------ defaults
    def resolved(self) -> "TrainConfig":
        """A copy with the stage's LLaVA-1.5 defaults filled in where a value is None."""
        out = dataclasses.replace(self)
        out.data = dataclasses.replace(self.data)
        out.regap, out.moca = dataclasses.replace(self.regap), dataclasses.replace(self.moca)
        out.qformer = dataclasses.replace(self.qformer)
        out.lora, out.observe = dataclasses.replace(self.lora), dataclasses.replace(self.observe)
        defaults = LLAVA15[self.stage]
        if out.tune is None:
            out.tune = defaults["tune"]
        if out.global_batch_size is None:
            out.global_batch_size = defaults["global_batch_size"]
        if out.lr is None:
            out.lr = LORA_LR if out.tune == "lora" else defaults["lr"]
        if out.projector_lr is None:
            out.projector_lr = LORA_PROJECTOR_LR if out.tune == "lora" else out.lr
        if out.template is None:
            out.template = defaults["template"]  # None in stage 2: the model's own template
        out.validate()
        out.dtype, out.mixed_precision = resolve_precision(out)
        return out

    def validate(self) -> None:
        """Value checks that do not depend on the number of processes."""
        _choice("stage", self.stage, (1, 2))
        _choice("dtype", self.dtype, DTYPES)
        check_attention(self.attn_implementation)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.tune is not None:
            _choice("tune", self.tune, TUNE[self.stage], f" for stage {self.stage}")
        if self.template is not None:
            from regap.models.templates import TEMPLATES

            _choice("template", self.template, TEMPLATES)
        _choice("data.feature_cache", self.data.feature_cache, ("auto", "on", "off"))
        _choice("regap.distance", self.regap.distance, DISTANCES)
        _choice("regap.pooling", self.regap.pooling, POOLINGS)
        _choice("regap.text_stats", self.regap.text_stats, TEXT_STATS)
        from regap.models.inputs import TEXT_TOKEN_MODES

        _choice("regap.text_tokens", self.regap.text_tokens, TEXT_TOKEN_MODES)
        _choice("observe.text_tokens", self.observe.text_tokens, TEXT_TOKEN_MODES)
        for tracker in self.observe.trackers:
            _choice("observe.trackers", tracker, TRACKERS)
        self._validate_projector()
        for name, value in (
            ("global_batch_size", self.global_batch_size), ("per_device_batch_size", self.per_device_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps), ("max_steps", self.max_steps),
            ("stop_after_steps", self.stop_after_steps), ("epochs", self.epochs), ("max_length", self.max_length),
            ("save_every", self.save_every), ("lora.r", self.lora.r), ("observe.log_every", self.observe.log_every),
            ("data.synth.n", self.data.synth.n if self.data.synth else None),
        ):
            if value is not None and value < 1:
                raise RegapError(f"config key '{name}' must be >= 1 (got {value})")
        for name, value in (
            ("regap.lam", self.regap.lam), ("regap.layer", self.regap.layer),
            ("regap.warmup_steps", self.regap.warmup_steps), ("regap.norm_weight", self.regap.norm_weight),
            ("regap.ridge", self.regap.ridge), ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm), ("keep_checkpoints", self.keep_checkpoints),
            ("observe.gap_every", self.observe.gap_every), ("observe.mir_every", self.observe.mir_every),
            ("observe.probe_size", self.observe.probe_size), ("data.num_workers", self.data.num_workers),
            ("lora.dropout", self.lora.dropout),
        ):
            if not value >= 0 or not math.isfinite(value):
                raise RegapError(f"config key '{name}' must be a finite number >= 0 (got {value})")
        for name, value in (("lr", self.lr), ("projector_lr", self.projector_lr)):
            if value is not None and (not value > 0 or not math.isfinite(value)):
                raise RegapError(f"config key '{name}' must be a finite number > 0 (got {value})")
        if not 0 <= self.warmup_ratio < 1:
            raise RegapError(f"config key 'warmup_ratio' must be in [0, 1) (got {self.warmup_ratio})")
        from regap.checks import check_seed

        check_seed(self.seed, "config key 'seed'")
        if self.data.synth is not None:
            check_seed(self.data.synth.seed, "config key 'data.synth.seed'")
        if not self.data.json:
            raise RegapError("config key 'data.json' is required (a LLaVA JSON file, or a path to generate with data.synth)")
        if self.moca.layers is not None and any(k < 1 for k in self.moca.layers):
            raise RegapError(f"config key 'moca.layers' holds decoder blocks numbered from 1 (got {self.moca.layers})")


    def _validate_projector(self) -> None:
        """`projector_type` and `qformer.*`: checked here, before any model is loaded."""
        if self.projector_type is not None:
            import re

            if self.projector_type not in ("linear", "qformer") and not re.fullmatch(r"mlp[1-9]\d*x_gelu", self.projector_type):
                raise RegapError(f"config key 'projector_type' is {self.projector_type!r}; "
                                 "valid: linear, mlpNx_gelu (e.g. mlp2x_gelu), qformer, or null (the model's own)")
        if self.qformer.trainable is not None:
            _choice("qformer.trainable", self.qformer.trainable, QFORMER_TRAINABLE)
        for name, value in self.qformer.options().items():
            if value < 1:
                raise RegapError(f"config key 'qformer.{name}' must be >= 1 (got {value})")
            if self.projector_type != "qformer":
                raise RegapError(f"config key 'qformer.{name}' sizes a fresh Q-Former: it needs projector_type: qformer "
                                 f"(got projector_type: {self.projector_type})")
        if self.projector_type not in (None, "qformer") and self.qformer.trainable == "linear":
            raise RegapError(f"config key 'qformer.trainable' is 'linear' but projector_type is {self.projector_type!r}, "
                             "not a Q-Former")
        options = self.qformer.options()
        if "hidden_size" in options or "num_attention_heads" in options:
            from regap.models.qformer import DEFAULTS

            hidden = options.get("hidden_size", DEFAULTS["hidden_size"])
            heads = options.get("num_attention_heads", DEFAULTS["num_attention_heads"])
            if hidden % heads:
                raise RegapError(f"config keys 'qformer.hidden_size' ({hidden}) and 'qformer.num_attention_heads' "
                                 f"({heads}): the hidden size must be divisible by the number of heads")


def _choice(name: str, value: Any, choices: tuple, where: str = "") -> None:
    if value not in choices:
        raise RegapError(f"config key '{name}' is {value!r}; valid{where}: {', '.join(map(str, choices))}")


def training_device(config: TrainConfig) -> str:
    """The device type a training run will use (what Accelerate picks for one process)."""
    import os

    import torch

    forced_cpu = config.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return "cpu" if forced_cpu or not torch.cuda.is_available() else "cuda"


def resolve_precision(config: TrainConfig) -> tuple[str, str]:
    """(dtype, mixed_precision) with `auto` resolved for the training device (see regap.precision)."""
    from regap.precision import mixed_precision_for, resolve_dtype

    dtype = resolve_dtype(config.dtype, training_device(config)).dtype
    mixed = mixed_precision_for(dtype) if config.mixed_precision == "auto" else config.mixed_precision
    return dtype, mixed


# ---------------------------------------------------------------------- files and overrides


def shipped_configs() -> dict[str, Path]:
    """Names and paths of the training configs that ship with regap (`src/regap/configs`)."""
    folder = resources.files("regap") / "configs"
    out = {}
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    for entry in entries:
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a shipped config (`tiny-stage1`, `llava-1.5-7b-stage1`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    key = str(name_or_path)
    key = key[: -len(".yaml")] if key.endswith(".yaml") else key
    if key in shipped:
        return shipped[key]
    if path.exists():
        raise RegapError(f"config path is not a file: {path}")
    raise RegapError(f"config not found: {name_or_path} (not a file; shipped configs: {', '.join(shipped)})")


def load_config(
    name_or_path: str | Path, overrides: list[str] | None = None, *, stage: int | None = None
) -> TrainConfig:
    """Read a config file (or shipped name), apply overrides, check every key and value.

    ``stage`` (from the command: pretrain = 1, finetune = 2) must agree with the file's
    ``stage`` when the file sets one.
    """
    path = resolve_config_path(name_or_path)
    data = typed.apply_overrides(TrainConfig, typed.read_yaml(path, "training config"), list(overrides or []))
    if stage is not None:
        file_stage = data.get("stage", stage)
        if file_stage != stage:
            command = "pretrain" if file_stage == 1 else "finetune"
            raise RegapError(f"{path} is a stage-{file_stage} config; run it with `regap {command}`")
        data["stage"] = stage
    return TrainConfig.from_dict(data, source=str(path))


def read_yaml(path: Path) -> dict[str, Any]:
    """A training config file's raw mapping (a run folder's `config.yaml`, a shipped config)."""
    return typed.read_yaml(path, "training config")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A raw training-config mapping with `key=value` overrides set (regap.config.apply_overrides)."""
    return typed.apply_overrides(TrainConfig, data, overrides)


# ---------------------------------------------------------------------- batch layout


def derive_batch_layout(
    global_batch_size: int, per_device: int | None, accumulation: int | None, num_processes: int
) -> tuple[int, int]:
    """(per-device batch, gradient-accumulation steps) with per x accum x processes = global."""
    g, p = global_batch_size, num_processes
    if per_device is not None and accumulation is not None:
        if per_device * accumulation * p != g:
            raise RegapError(
                f"per_device_batch_size={per_device} x gradient_accumulation_steps={accumulation} x {p} process(es)"
                f" = {per_device * accumulation * p}, not global_batch_size={g}; drop one of the two to derive it"
            )
        return per_device, accumulation
    if per_device is not None:
        if g % (per_device * p):
            raise RegapError(
                f"global_batch_size={g} is not divisible by per_device_batch_size={per_device} x {p} process(es)"
            )
        return per_device, g // (per_device * p)
    if accumulation is not None:
        if g % (accumulation * p):
            raise RegapError(
                f"global_batch_size={g} is not divisible by gradient_accumulation_steps={accumulation} x {p} process(es)"
            )
        return g // (accumulation * p), accumulation
    if g % p:
        raise RegapError(f"global_batch_size={g} is not divisible by {p} processes")
    return g // p, 1


#: Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = ("stop_after_steps", "save_every", "keep_checkpoints", "observe", "data.num_workers",
                     "data.feature_cache",
                     "per_device_batch_size", "gradient_accumulation_steps", "cpu", "attn_implementation")
#: Paths whose *content* a resume checks by sha256 (the checkpoint records it), so a run folder moved or
#: copied with its data continues: the data file (`data_sha256`), its images (named by the data file) and
#: stage 2's initial projector (`projector_sha256`).
CONTENT_CHECKED_PATHS = ("data.json", "data.image_root", "projector")


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """Keys whose values differ, as dotted paths (RESUMABLE_CHANGES are ignored). A key missing
    from `old` (a run saved before the key existed) counts as its default value."""
    if defaults is None and not prefix:
        defaults = TrainConfig().to_dict()
    defaults = defaults or {}
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}.{key}" if prefix else key
        if any(path == k or path.startswith(k + ".") for k in RESUMABLE_CHANGES + CONTENT_CHECKED_PATHS):
            continue
        a, b = old.get(key, defaults.get(key)), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            out += config_differences(a, b, path, sub if isinstance(sub, dict) else {})
        elif a != b:
            out.append(path)
    return out
