"""Can a linear read-out of the tiny preset's image features tell a scene's colours, shapes,
positions and counts? The study asks whether its projector learns to *see*; this separates "the
vision features do not carry it" from "the training budget is too small to learn it".

For N synthetic scenes (training split) the frozen vision tower gives 64 tokens x 384 dims. A
linear probe (torch, AdamW, weight decay) is trained on 70 % of the scenes and scored on the rest,
for each attribute of single-group scenes (colour, shape, position) and for the object count of
all scenes, from (a) the mean over tokens and (b) all 64 tokens concatenated (position needs the
token order). Chance is the majority class of the test split.

    python bench/vision_probe.py --n 600 --out bench/vision_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def features(n: int, seed: int) -> tuple[torch.Tensor, list]:
    from regap.data.synth import render_scene, synth_item
    from regap.models import load_model

    model = load_model("tiny", dtype="float32")
    processor = model.vision.image_processor
    specs, batches = [], []
    for start in range(0, n, 32):
        items = [synth_item(seed, i) for i in range(start, min(n, start + 32))]
        images = [render_scene(item.spec, 224) for item in items]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            batches.append(model.vision(pixels).float())
        specs += [item.spec for item in items]
    return torch.cat(batches), specs


def probe(x: torch.Tensor, y: list[str], seed: int = 0, epochs: int = 300) -> dict:
    classes = sorted(set(y))
    target = torch.tensor([classes.index(v) for v in y])
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    cut = int(0.7 * len(y))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mean) / std
    layer = torch.nn.Linear(z.shape[1], len(classes))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=1e-1)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(layer(z[train]), target[train]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((layer(z[test]).argmax(1) == target[test]).float().mean())
    majority = max(float((target[test] == k).float().mean()) for k in range(len(classes)))
    return {"accuracy": round(accuracy, 3), "chance": round(majority, 3), "n_train": cut, "n_test": len(test),
            "classes": len(classes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.time()
    x, specs = features(args.n, args.seed)
    single = [i for i, s in enumerate(specs) if len(s.groups) == 1]
    views = {"mean over tokens": x.mean(1), "64 tokens concatenated": x.flatten(1)}
    result = {"n_scenes": args.n, "n_single_group": len(single), "feature_shape": list(x.shape[1:]), "probes": {}}
    for view, data in views.items():
        rows = {}
        for attribute in ("color", "shape", "position"):
            rows[attribute] = probe(data[single], [getattr(specs[i].groups[0], attribute) for i in single])
        rows["n_objects"] = probe(data, [str(s.n_objects) for s in specs])
        result["probes"][view] = rows
    result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
