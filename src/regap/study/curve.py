"""The learning curve of a unit: held-out synthetic QA accuracy at every kept checkpoint of stage 1
and stage 2, next to the training loss (stage 1: the caption loss; stage 2: the answer loss).

Why: the study's training lengths must be justified by the model learning to see (the bar is
QA >= 0.6 after stage 2, chance about 0.25). Each checkpoint's trained parts (projector,
LoRA adapter, MoCa) are loaded into one model in turn, so the base weights load once per stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from regap.files import write_json_atomic


def qa_curve(work: Path, scenes: int, max_new_tokens: int, dtype: str, out_path: Path) -> dict[str, Any]:
    """QA accuracy per checkpoint of `work/stage1` and `work/stage2`; written to `out_path`."""
    from regap.models.loading.load import load_trained
    from regap.models.loading.trained import load_checkpoint_parts
    from regap.utility import UtilityRun, run_utility

    result: dict[str, Any] = {"scenes": scenes, "max_new_tokens": max_new_tokens}
    for stage in (1, 2):
        folder = work / f"stage{stage}"
        checkpoints = sorted((folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        model = load_trained(folder, dtype=dtype)
        points = []
        for checkpoint in checkpoints:
            load_checkpoint_parts(model, checkpoint)
            target = work / "curve" / f"stage{stage}-{checkpoint.name}"
            run = UtilityRun(model=model.config.name, out=target, tasks="synthetic-qa", n=scenes, seed=0,
                             max_new_tokens=max_new_tokens, dtype=dtype)
            utility = run_utility(run, model=model)
            qa = utility["tasks"]["synthetic-qa"]
            points.append({"step": int(checkpoint.name.split("-")[1]), "qa": qa["score"], "ci": qa["ci"],
                           "per_type": {t: v["score"] for t, v in qa.get("per_type", {}).items()}})
            shutil.rmtree(target / "heldout_data", ignore_errors=True)
        losses = []
        metrics = folder / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                row = json.loads(line) if line.strip() else {}
                if isinstance(row.get("step"), int) and row.get("loss") is not None:
                    losses.append({"step": row["step"], "loss": row.get("caption_loss", row["loss"])})
        result[f"stage{stage}"] = {"qa": points, "loss": losses}
        del model
    write_json_atomic(out_path, result)
    return result
