"""Command-line options that several commands share, defined once so their help and names agree."""

from __future__ import annotations

import typer

#: `--attn-implementation` on the commands that load a model to run it (`regap.models.attention`).
ATTN_IMPLEMENTATION = typer.Option(
    None, "--attn-implementation",
    help="The LLM's attention kernel: eager, sdpa (transformers' default), flash_attention_2 (GPU, needs its "
         "package), ... Default: the library's choice. It changes speed and rounding, not the model; it is "
         "part of the model fingerprint, so caches and calibration files are kept per kernel.")
