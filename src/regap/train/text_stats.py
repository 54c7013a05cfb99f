"""The corpus text statistics of the Fréchet ReGap: at layer 0 with frozen input embeddings the
text side is the embedding table weighted by how often each token occurs in the training
inputs, so its mean, covariance and covariance square root are computed once (on the main
process), cached under ``$REGAP_CACHE/train/text_stats/`` and copied into the run folder."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regap.errors import RegapError
from regap.train import checkpoint as ckpt
from regap.train.config import TrainConfig
from regap.train.regap_loss import ReGapLoss, corpus_token_counts, text_stats_from_counts

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

TEXT_STATS_FILE = "text_stats.safetensors"


def uses_corpus_stats(config: TrainConfig, lvlm: LVLM) -> bool:
    """Whether the run's ReGap takes its text side from the corpus statistics (`regap.text_stats`)."""
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


def prepare_text_stats(regap: ReGapLoss, lvlm: LVLM, dataset: Any, config: TrainConfig, data_sha: str,
                       out_dir: Path, accelerator: Any, log: Any) -> None:
    """Mean, covariance and its square root of the corpus's layer-0 text tokens, cached."""
    from regap.cache import announce, cache_root, ensure_writable
    from regap.models.templates import get_template

    weight = lvlm.llm.get_input_embeddings().weight
    key_data = {
        "model": config.model, "llm": lvlm.config.llm_source, "template": config.template or lvlm.config.template,
        "data_sha256": data_sha, "max_length": config.max_length, "max_items": config.data.max_items,
        "shape": list(weight.shape), "weight_sum": float(weight.detach().double().sum()),
        "ridge": config.regap.ridge, "tokens_per_image": lvlm.tokens_per_image,
        "text_tokens": config.regap.text_tokens,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    try:
        cached = ensure_writable(cache_root() / "train" / "text_stats") / f"{key}.safetensors"
    except OSError as exc:  # a read-only or full cache: computed for this run only, into its folder
        if accelerator.is_main_process:
            announce(f"text statistics not cached ({cache_root()}: {exc.strerror or exc}); kept in {out_dir}")
        cached = out_dir / f".text_stats-{key}.safetensors"
    if accelerator.is_main_process and not cached.is_file():
        log("computing the corpus text statistics for the Fréchet ReGap (once, then cached)")
        template = get_template(config.template or lvlm.config.template, lvlm.tokenizer)
        conversations = [[{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                          for t in row["conversations"]] for row in dataset.to_llava_rows()]
        counts = corpus_token_counts(conversations, lvlm.tokenizer, template, tokens_per_image=lvlm.tokens_per_image,
                                     max_length=config.max_length, vocab_size=weight.shape[0],
                                     text_tokens=config.regap.text_tokens)
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
