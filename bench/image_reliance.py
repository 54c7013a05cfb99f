"""Does a trained model use the image? Caption / answer loss with the right image, another scene's image,
and a blank image, on the same held-out targets.

A model that reads the image has a lower loss with the right image than with another scene's; a blind one
has the same loss with both (its answers come from the caption grammar and the answer prior alone). This
separates "does not see" from "sees but answers badly", which held-out QA accuracy alone cannot.

    python bench/image_reliance.py --unit W/units/plain-s0 --stage 1 --n 48
    python bench/image_reliance.py --unit W/units/plain-s0 --stage 2 --n 48 --json bench/image_reliance.json

The held-out data are those the study's utility step generated (`UNIT/utility/heldout_data`): captions for
stage 1 (the `plain` template of stage-1 training), instructions for stage 2 (the chat template).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import stats

from regap.data.llava_json import LlavaJsonDataset
from regap.models.loading.load import load_model
from regap.models.inputs import IGNORE_INDEX
from regap.models.loading.saved import load_adapter, load_projector
from regap.train.collate import Collator, LoadedSample


def per_sample_loss(model, batch) -> np.ndarray:
    """Mean next-token cross-entropy over each sample's target tokens."""
    with torch.no_grad():
        logits = model(batch, use_labels=False).logits.float()
    labels = batch.labels.to(logits.device)
    shifted, targets = logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), targets.clamp(min=0), reduction="none")
    keep = targets != IGNORE_INDEX
    return ((loss * keep).sum(1) / keep.sum(1)).cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", required=True, type=Path, help="a study unit's work folder (W/units/NAME)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--stage-dir", type=Path, help="the trained stage folder (default: UNIT/stage<STAGE>)")
    parser.add_argument("--n", type=int, default=48, help="held-out scenes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path, help="append the result to this JSON file (a list)")
    args = parser.parse_args()

    stage_dir = args.stage_dir or args.unit / f"stage{args.stage}"
    data_dir = args.unit / "utility" / "heldout_data"
    model = load_model(args.model, dtype=args.dtype)
    load_projector(model, stage_dir / "projector.safetensors")
    if args.stage == 2:
        load_adapter(model, stage_dir / "adapter")
    model.eval()
    data = LlavaJsonDataset(data_dir / ("captions.json" if args.stage == 1 else "instructions.json"), max_items=args.n)
    samples = [data[i] for i in range(len(data))]
    collate = Collator(model, "plain" if args.stage == 1 else "chat", max_length=512)
    blank = Image.new("RGB", samples[0].image.size, (128, 128, 128))
    n = len(samples)
    conditions = {
        "matched": [s.image for s in samples],
        "other scene": [samples[(i + n // 2) % n].image for i in range(n)],  # a derangement for n >= 2
        "blank": [blank] * n,
    }
    start = time.perf_counter()
    losses: dict[str, np.ndarray] = {}
    for name, images in conditions.items():
        values = []
        for lo in range(0, n, args.batch_size):
            items = [LoadedSample(i, dataclasses.replace(samples[i], image=images[i]))
                     for i in range(lo, min(n, lo + args.batch_size))]
            values.append(per_sample_loss(model, collate(items).inputs))
        losses[name] = np.concatenate(values)
    result = {"unit": args.unit.name, "stage_dir": str(stage_dir), "stage": args.stage, "n": n, "dtype": str(model.dtype),
              "seconds": round(time.perf_counter() - start, 1),
              "mean_loss": {k: float(v.mean()) for k, v in losses.items()}}
    for other in ("other scene", "blank"):
        diff = losses["matched"] - losses[other]
        ci = stats.bootstrap((diff,), np.mean, n_resamples=2000, random_state=0).confidence_interval
        result[f"matched - {other}"] = {"mean": float(diff.mean()), "ci95": [float(ci.low), float(ci.high)],
                                        "wilcoxon_p": float(stats.wilcoxon(diff).pvalue)}
    print(json.dumps(result, indent=1))
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(existing + [result], indent=1) + "\n")


if __name__ == "__main__":
    main()
