"""Training: stage-1 projector pretraining with the ReGap regulariser, stage-2 instruction
tuning (full or LoRA), and the MoCa baseline, on Hugging Face Accelerate.

See ``docs/training.md``. Entry points:

* :func:`train` - run a stage from a :class:`TrainConfig` (``regap pretrain`` / ``regap finetune``);
* :func:`load_config` - a YAML file or shipped config name, plus ``key=value`` overrides;
* :class:`ReGapLoss` - the regulariser (usable on its own);
* :class:`TrainStep` - one micro-batch: losses, backward, optimizer step (what `train` runs);

The model a run leaves is loaded with `regap.models.load_model(OUT)` (MoCa: `regap.models.moca`).
"""

from regap.train.config import (
    TrainConfig,
    apply_overrides,
    derive_batch_layout,
    load_config,
    resolve_config_path,
    shipped_configs,
)
from regap.train.hooks import HiddenCapture
from regap.train.loop import TrainResult, train
from regap.train.module import TrainModule
from regap.train.step import NonFiniteLossError, TrainStep, compute_losses
from regap.train.observe import probe_gaps, read_metrics, training_seconds
from regap.train.regap_loss import GapOutput, ReGapLoss, corpus_token_counts, text_stats_from_counts

__all__ = [
    "GapOutput",
    "HiddenCapture",
    "NonFiniteLossError",
    "ReGapLoss",
    "TrainConfig",
    "TrainModule",
    "TrainResult",
    "TrainStep",
    "apply_overrides",
    "compute_losses",
    "corpus_token_counts",
    "derive_batch_layout",
    "load_config",
    "probe_gaps",
    "read_metrics",
    "resolve_config_path",
    "shipped_configs",
    "text_stats_from_counts",
    "train",
    "training_seconds",
]


#: Names that lived here and moved to the model layer (one import path each); deprecated aliases.
_MOVED = {"load_trained": "regap.models.loading.load", "MoCa": "regap.models.moca", "load_moca": "regap.models.moca",
          "save_moca": "regap.models.moca", "decoder_layers": "regap.models.layers"}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"regap.train.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
