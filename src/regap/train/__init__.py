"""Training: stage-1 projector pretraining with the ReGap regulariser, stage-2 instruction
tuning (full or LoRA), and the MoCa baseline, on Hugging Face Accelerate.

See ``docs/training.md``. Entry points:

* :func:`train` - run a stage from a :class:`TrainConfig` (``regap pretrain`` / ``regap finetune``);
* :func:`load_config` - a YAML file or shipped config name, plus ``key=value`` overrides;
* :class:`ReGapLoss` - the regulariser (usable on its own);
* :class:`TrainStep` - one micro-batch: losses, backward, optimizer step (what `train` runs);
* :class:`MoCa` - the learnable image-token scale/shift baseline (`regap.models.moca`, re-exported);
* :func:`load_trained` - rebuild a trained model from an output folder.
"""

from regap.models.moca import MoCa, load_moca, save_moca
from regap.train.config import (
    TrainConfig,
    apply_overrides,
    derive_batch_layout,
    load_config,
    resolve_config_path,
    shipped_configs,
)
from regap.train.hooks import HiddenCapture, decoder_layers
from regap.train.loop import TrainResult, train
from regap.train.module import TrainModule
from regap.train.outputs import load_trained
from regap.train.step import NonFiniteLossError, TrainStep, compute_losses
from regap.train.observe import probe_gaps, read_metrics, training_seconds
from regap.train.regap_loss import GapOutput, ReGapLoss, corpus_token_counts, text_stats_from_counts

__all__ = [
    "GapOutput",
    "HiddenCapture",
    "MoCa",
    "NonFiniteLossError",
    "ReGapLoss",
    "TrainConfig",
    "TrainModule",
    "TrainResult",
    "TrainStep",
    "apply_overrides",
    "compute_losses",
    "corpus_token_counts",
    "decoder_layers",
    "derive_batch_layout",
    "load_config",
    "load_moca",
    "load_trained",
    "probe_gaps",
    "read_metrics",
    "resolve_config_path",
    "save_moca",
    "shipped_configs",
    "text_stats_from_counts",
    "train",
    "training_seconds",
]
